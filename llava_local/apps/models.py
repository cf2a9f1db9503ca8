"""What is installed, what is available and whether it fits; and pulling a model.

Installed models come from four places: the Ollama daemon (if it answers within a
second: its tags, and whether each can see pictures), GGUF pairs of catalogue
entries in the Hugging Face cache, the pair named by ``LLAVA_LOCAL_MODEL`` /
``LLAVA_LOCAL_MMPROJ``, and the bundled demo. Whether a model fits compares its
memory with what is available now: for files on disk, :mod:`llava_local.memory`'s
estimate from their headers; for the catalogue and Ollama's tags, the rougher
:func:`llava_local.catalog.estimate_memory` from file sizes. For each GGUF pair (and the
demo) the report also carries the llama.cpp engine's budget as ``serve`` opens it
(:func:`llama_budget`: conversations at once, their context and KV cache, and the
memory for kept KV states), on this machine and, with a device, on that board.

:func:`pull` fetches a model either way: an Ollama tag through the daemon's
``/api/pull``, or a catalogue entry's GGUF pair with ``huggingface_hub`` into its
cache (``HF_HUB_CACHE``; ``HF_ENDPOINT`` for a mirror; ``HF_HUB_OFFLINE=1`` to use
only what is cached). A dropped connection resumes where it stopped with an HTTP
range request; a download stopped by Ctrl-C starts that file again next time
(``huggingface_hub`` 2.x deletes partial files), and files already complete are
never fetched again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, cast

import httpx
import ollama
from pydantic import BaseModel

from .. import catalog, devices, host
from ..backends import registry
from ..backends.llama_cpp.config import LlamaCppConfig, memory_budget
from ..backends.llama_cpp.kv_budget import KVBudget
from ..catalog import CatalogEntry, estimate_memory
from ..demo import DEMO_NAME, demo_paths
from ..devices import Budget, Device, DeviceName
from ..errors import (
    BackendError,
    BackendUnavailableError,
    InvalidRequestError,
    LlavaLocalError,
    MissingDependencyError,
    ModelNotFoundError,
)
from ..progress import DownloadProgress
from ..protocols.ollama import short_name
from ..resolve import hf_cache_dir, huggingface_hub, pulled_pair

__all__ = [
    "AvailableModel",
    "InstalledModel",
    "ModelsReport",
    "OllamaStatus",
    "PairOnDevice",
    "PullResult",
    "available_memory",
    "cached_pairs",
    "demo_model",
    "device_budgets",
    "download_gguf",
    "env_pair",
    "hf_cache_dir",
    "hub_unreachable",
    "list_models",
    "llama_budget",
    "ollama_models",
    "ollama_version",
    "pair_memory",
    "pairs_on_device",
    "pull",
    "pull_engines",
    "pulled_pair",
    "this_board",
]

Source = Literal["ollama", "hf-cache", "env", "demo"]


class OllamaStatus(BaseModel):
    """Whether the daemon answered, and what it said."""

    host: str
    reachable: bool
    version: str | None = None
    error: str | None = None


class InstalledModel(BaseModel):
    """A model this machine has, from one source."""

    name: str
    source: Source
    catalog_name: str | None = None
    vision: bool | None = None
    size_bytes: int | None = None
    memory_bytes: int | None = None
    fits: bool | None = None
    model_path: Path | None = None
    mmproj_path: Path | None = None
    note: str = ""
    #: For a GGUF pair: what the llama.cpp engine holds for it on this machine, as
    #: ``serve`` opens it (:func:`llama_budget`); None for Ollama's models, or when its
    #: files cannot be read.
    budget: KVBudget | None = None


class PairOnDevice(BaseModel):
    """A GGUF pair of this machine on a board: the llama.cpp engine's budget against
    each of its RAM sizes (GiB -> budget), as ``serve`` would open it there."""

    name: str
    device: DeviceName
    budgets: dict[int, KVBudget]


class AvailableModel(BaseModel):
    """A catalogue entry, where it is installed already, and whether it would fit."""

    entry: CatalogEntry
    installed: list[Source]
    fits: bool | None


class ModelsReport(BaseModel):
    """Everything ``llava-local models`` shows; with a device, each model's budget on it
    (memory against the board's, and speeds that are estimates)."""

    ollama: OllamaStatus
    hf_cache: Path | None
    available_memory_bytes: int | None
    installed: list[InstalledModel]
    available: list[AvailableModel]
    device: Device | None = None
    budgets: list[Budget] = []
    #: With a device: this machine's GGUF pairs (and the demo) on that board.
    pairs_on_device: list[PairOnDevice] = []


class PullResult(BaseModel):
    """What :func:`pull` fetched: an Ollama tag, or the local paths of a GGUF pair."""

    name: str
    backend: Literal["ollama", "llama_cpp"]
    ollama_tag: str | None = None
    model_path: Path | None = None
    mmproj_path: Path | None = None


# --- memory --------------------------------------------------------------------------


def available_memory() -> int | None:
    """Bytes of memory available now (:func:`llava_local.host.available_bytes`)."""
    return host.available_bytes()


def llama_budget(
    model: Path | None,
    mmproj: Path | None = None,
    *,
    available: int | None = None,
    n_threads: int | None = None,
) -> KVBudget:
    """What the llama.cpp engine holds for ``model`` (a GGUF path, or None for the demo)
    and its projector (None: the one beside it) with ``parallel="auto"``, as ``serve``
    opens it, against ``available`` bytes (default: this machine's now). Raises
    :class:`~llava_local.errors.ModelNotFoundError` or
    :class:`~llava_local.errors.ModelLoadError` for files that are not such a pair."""
    config = LlamaCppConfig(
        model=str(model) if model is not None else None,
        mmproj=str(mmproj) if mmproj is not None else None,
        parallel="auto",
        n_threads=n_threads,
    )
    return memory_budget(config, available=available)


def _budget_or_none(files: tuple[Path | None, Path | None], **kwargs: Any) -> KVBudget | None:
    """:func:`llama_budget`, or None when the files cannot be read as a pair (a listing
    shows what it can)."""
    try:
        return llama_budget(*files, **kwargs)
    except (LlavaLocalError, OSError, ValueError, KeyError, IndexError):
        return None


def _fits(needed: int | None, available: int | None) -> bool | None:
    if needed is None or available is None:
        return None
    return needed <= available


# --- what is installed ---------------------------------------------------------------


def ollama_models(
    host: str | None = None, *, timeout: float = 1.0
) -> tuple[OllamaStatus, list[InstalledModel]]:
    """The daemon's models and whether each sees pictures; an unreachable daemon gives
    ``reachable=False`` and no models (within about ``timeout`` seconds)."""
    from ..backends.ollama import listed_models, resolve_host

    url = resolve_host(host)
    status = ollama_version(url, timeout=timeout)
    if not status.reachable:
        return status, []
    timeouts = httpx.Timeout(max(timeout, 5.0), connect=timeout)
    try:
        with ollama.Client(host=url, timeout=timeouts) as client:
            models = [
                _ollama_model(entry.model or "", entry.size, vision)
                for entry, vision in listed_models(client)
            ]
    except (httpx.HTTPError, ollama.ResponseError, ValueError, OSError) as exc:
        error = f"it answered, but listing its models failed: {exc}"
        return status.model_copy(update={"error": error}), []
    return status, models


def ollama_version(host: str | None = None, *, timeout: float = 1.0) -> OllamaStatus:
    """Whether a daemon answers at ``host`` (within ``timeout``), and its version."""
    from ..backends.ollama import daemon_version, resolve_host

    url = resolve_host(host)
    try:
        with httpx.Client(base_url=url, timeout=httpx.Timeout(timeout)) as http:
            version, status = daemon_version(http)
    except (httpx.HTTPError, OSError) as exc:
        return OllamaStatus(host=url, reachable=False, error=str(exc) or type(exc).__name__)
    if version is None:
        error = f"{url} answers GET /api/version with {status}, not as Ollama"
        return OllamaStatus(host=url, reachable=False, error=error)
    return OllamaStatus(host=url, reachable=True, version=version)


def _ollama_model(name: str, size: int | None, vision: bool | None) -> InstalledModel:
    found = catalog.match(name)
    entry = found[0] if found and found[1] == "ollama" else None
    kv = entry.kv_bytes_per_token if entry else None
    tokens = entry.image_tokens if entry else 576
    memory = (
        None if not size else estimate_memory(size, 0, kv_bytes_per_token=kv, image_tokens=tokens)
    )
    return InstalledModel(
        name=short_name(name),
        source="ollama",
        catalog_name=entry.name if entry else None,
        vision=vision,
        size_bytes=size or None,
        memory_bytes=memory,
    )


def cached_pairs(cache_dir: str | os.PathLike[str] | None = None) -> list[InstalledModel]:
    """Catalogue GGUF pairs in the Hugging Face cache (``scan_cache_dir``), newest
    revision first; a pair missing one file is listed with a note saying which."""
    hub = huggingface_hub()
    try:
        info = hub.scan_cache_dir(hf_cache_dir(cache_dir))
    except hub.CacheNotFound:
        return []
    by_repo = {entry.hf_repo: entry for entry in catalog.CATALOG if entry.has_gguf}
    found: list[InstalledModel] = []
    for repo in info.repos:
        entry = by_repo.get(repo.repo_id)
        if entry is None or repo.repo_type != "model":
            continue
        revisions = sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True)
        for revision in revisions:
            files = {f.file_name: f for f in revision.files}
            lm, mm = files.get(str(entry.gguf)), files.get(str(entry.mmproj))
            if lm is None and mm is None:
                continue
            found.append(_cached_model(entry, lm, mm))
            break
    return found


def pair_memory(model: Path, mmproj: Path, image_tokens: int, fallback: int) -> int:
    """Memory a downloaded pair needs, from its GGUF headers
    (:func:`llava_local.memory.estimate` at the engine's default context: one picture
    plus :data:`~llava_local.catalog.TEXT_TOKENS`); ``fallback`` when they cannot be read."""
    from ..memory import estimate

    try:
        return estimate(model, mmproj, n_ctx=image_tokens + catalog.TEXT_TOKENS).needed_bytes
    except (LlavaLocalError, OSError, ValueError, KeyError, IndexError):
        return fallback


def _cached_model(entry: CatalogEntry, lm: Any, mm: Any) -> InstalledModel:
    size = (lm.size_on_disk if lm else 0) + (mm.size_on_disk if mm else 0)
    missing = [name for name, f in ((entry.gguf, lm), (entry.mmproj, mm)) if f is None]
    memory = None
    if lm and mm:
        guess = estimate_memory(
            lm.size_on_disk,
            mm.size_on_disk,
            kv_bytes_per_token=entry.kv_bytes_per_token,
            image_tokens=entry.image_tokens,
        )
        memory = pair_memory(Path(lm.file_path), Path(mm.file_path), entry.image_tokens, guess)
    return InstalledModel(
        name=entry.name,
        source="hf-cache",
        catalog_name=entry.name,
        vision=True,
        size_bytes=size,
        memory_bytes=memory,
        model_path=Path(lm.file_path) if lm else None,
        mmproj_path=Path(mm.file_path) if mm else None,
        note=f"incomplete: {', '.join(map(str, missing))} missing; pull it again"
        if missing
        else "",
    )


def env_pair() -> InstalledModel | None:
    """The pair ``LLAVA_LOCAL_MODEL`` / ``LLAVA_LOCAL_MMPROJ`` name, if set."""
    model = os.environ.get("LLAVA_LOCAL_MODEL")
    if not model:
        return None
    mmproj = os.environ.get("LLAVA_LOCAL_MMPROJ")
    lm_path = Path(model).expanduser()
    mm_path = Path(mmproj).expanduser() if mmproj else None
    problems = [str(p) for p in (lm_path, mm_path) if p is not None and not p.is_file()]
    sizes = [p.stat().st_size for p in (lm_path, mm_path) if p is not None and p.is_file()]
    memory = None
    if mm_path is not None and len(sizes) == 2:
        memory = pair_memory(lm_path, mm_path, 576, estimate_memory(sizes[0], sizes[1]))
    notes = [f"missing: {', '.join(problems)}"] if problems else []
    if mm_path is None:
        notes.append("LLAVA_LOCAL_MMPROJ unset: the one *mmproj*.gguf beside the model is used")
    note = "; ".join(notes)
    return InstalledModel(
        name=lm_path.name,
        source="env",
        vision=True,
        size_bytes=sum(sizes) or None,
        memory_bytes=memory,
        model_path=lm_path,
        mmproj_path=mm_path,
        note=note,
    )


def demo_model() -> InstalledModel | None:
    """The bundled demo pair, when the package carries it."""
    try:
        lm, mm = demo_paths()
    except ModelNotFoundError:
        return None
    lm_size, mm_size = lm.stat().st_size, mm.stat().st_size
    tokens = catalog.find(DEMO_NAME).image_tokens
    guess = estimate_memory(lm_size, mm_size, image_tokens=tokens)
    return InstalledModel(
        name=DEMO_NAME,
        source="demo",
        catalog_name=DEMO_NAME,
        vision=True,
        size_bytes=lm_size + mm_size,
        memory_bytes=pair_memory(lm, mm, tokens, guess),
        model_path=lm,
        mmproj_path=mm,
        note="digits, shapes and colours only",
    )


def list_models(
    *,
    host: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    timeout: float = 1.0,
    device: str | None = None,
) -> ModelsReport:
    """Installed models (all sources), the catalogue, and what fits in memory now; with
    ``device`` (``pi4``, ``pi5``), every catalogue model's budget on that board."""
    board = devices.find_device(device) if device else None
    status, installed = ollama_models(host, timeout=timeout)
    try:
        cache: Path | None = hf_cache_dir(cache_dir)
        installed += cached_pairs(cache)
    except MissingDependencyError:
        cache = None
    installed += [m for m in (env_pair(), demo_model()) if m is not None]
    available = available_memory()
    installed = [
        m.model_copy(
            update={"fits": _fits(m.memory_bytes, available), "budget": _budget_here(m, available)}
        )
        for m in installed
    ]
    where: dict[str, list[Source]] = {}
    for model in installed:
        if model.catalog_name:
            where.setdefault(model.catalog_name, []).append(model.source)
    listing = [
        AvailableModel(
            entry=entry,
            installed=where.get(entry.name, []),
            fits=_fits(_entry_memory(entry, installed), available),
        )
        for entry in catalog.CATALOG
    ]
    return ModelsReport(
        ollama=status,
        hf_cache=cache,
        available_memory_bytes=available,
        installed=installed,
        available=listing,
        device=board,
        budgets=device_budgets(board) if board else [],
        pairs_on_device=pairs_on_device(installed, board) if board else [],
    )


def _pair(model: InstalledModel) -> tuple[Path | None, Path | None] | None:
    """The files of a local GGUF pair the engine can open (None for the demo's), or None
    for Ollama's models and incomplete pairs."""
    if model.source == "demo":
        return None, None
    if model.source == "ollama" or model.model_path is None or model.note.startswith("incomplete"):
        return None
    return model.model_path, model.mmproj_path


def _budget_here(model: InstalledModel, available: int | None) -> KVBudget | None:
    files = _pair(model)
    return None if files is None else _budget_or_none(files, available=available)


def pairs_on_device(installed: list[InstalledModel], device: Device) -> list[PairOnDevice]:
    """Each local GGUF pair (and the demo) with the llama.cpp engine's budget on each of
    ``device``'s RAM sizes (:func:`llava_local.devices.available_bytes`, four threads)."""
    found = []
    for model in installed:
        files = _pair(model)
        if files is None or model.budget is None:  # unreadable here, unreadable there
            continue
        budgets = {}
        for gib in device.ram_gib:
            room = devices.available_bytes(gib)
            one = _budget_or_none(files, available=room, n_threads=devices.CORES)
            if one is not None:
                budgets[gib] = one
        found.append(PairOnDevice(name=model.name, device=device.name, budgets=budgets))
    return found


def this_board() -> str | None:
    """``pi4`` or ``pi5`` when running on such a Raspberry Pi."""
    found = host.board()
    return found.device if found else None


def device_budgets(device: Device) -> list[Budget]:
    """Every catalogue model on ``device``; the bundled demo from its files."""
    found = []
    for entry in catalog.CATALOG:
        if entry.name == DEMO_NAME:
            try:
                lm, mm = demo_paths()
            except ModelNotFoundError:
                continue
            params, flops = devices.file_facts(lm, mm, entry.image_tokens)
            one = devices.budget(
                entry,
                device,
                lm_bytes=lm.stat().st_size,
                mmproj_bytes=mm.stat().st_size,
                lm_params=params,
                vision_flops=flops,
            )
        else:
            one = devices.budget(entry, device)
        if one is not None:
            found.append(one)
    return found


def _entry_memory(entry: CatalogEntry, installed: list[InstalledModel]) -> int | None:
    """The catalogue's estimate, or for the demo, the installed files'."""
    if entry.memory_bytes is not None:
        return entry.memory_bytes
    sizes = [m.memory_bytes for m in installed if m.catalog_name == entry.name]
    return next((size for size in sizes if size is not None), None)


# --- pulling -------------------------------------------------------------------------


def pull(
    name: str,
    *,
    host: str | None = None,
    progress: bool = True,
    backend: str = "auto",
    cache_dir: str | os.PathLike[str] | None = None,
    endpoint: str | None = None,
    revision: str | None = None,
) -> PullResult:
    """Fetch ``name``: an Ollama tag through the daemon, a catalogue entry's GGUF pair
    from the Hugging Face Hub. Progress goes to stderr.

    With ``backend="auto"`` a catalogue name downloads its GGUF pair (its Ollama tag if
    it has no GGUF), the Ollama tag of an entry (``llava-phi3``) pulls through Ollama,
    and any other name is pulled through Ollama if a daemon answers. ``"ollama"`` or
    ``"llama_cpp"`` force one engine. ``cache_dir`` / ``endpoint`` / ``revision`` go to
    ``huggingface_hub`` (defaults: its cache, ``HF_ENDPOINT``, ``main``).
    """
    backend = _pulling_engine(backend)
    found = catalog.match(name)
    entry, via = found if found else (None, None)
    if entry is not None and entry.name == DEMO_NAME:
        if backend == "ollama":
            raise InvalidRequestError("the demo model is bundled for llama.cpp; Ollama has no copy")
        model, mmproj = demo_paths()
        return PullResult(name=DEMO_NAME, backend="llama_cpp", model_path=model, mmproj_path=mmproj)
    if backend == "llama_cpp" or (backend == "auto" and entry and via == "name" and entry.has_gguf):
        if entry is None:
            catalog.find(name)  # raises, listing the choices
        if entry is None or not entry.has_gguf:
            raise InvalidRequestError(
                f"{name!r} has no GGUF files in the catalogue; pull it with Ollama instead"
            )
        model, mmproj = download_gguf(
            entry, cache_dir=cache_dir, endpoint=endpoint, revision=revision, progress=progress
        )
        return PullResult(
            name=entry.name, backend="llama_cpp", model_path=model, mmproj_path=mmproj
        )
    tag = entry.ollama if entry is not None and via == "name" else name
    if tag is None:
        raise InvalidRequestError(f"{name!r} is not in Ollama's library; pull its GGUF files")
    if backend == "auto" and entry is None:
        status = ollama_version(host)
        if not status.reachable:
            try:
                catalog.find(name)
            except ModelNotFoundError as exc:
                raise ModelNotFoundError(
                    f"{exc}; and no Ollama daemon answers at {status.host} to pull it from "
                    "Ollama's library (start one with `ollama serve`)"
                ) from None
    from ..backends.ollama import pull_model

    with DownloadProgress(tag, enabled=progress) as bars:
        pull_model(tag, host=host, on_update=bars)
    return PullResult(name=entry.name if entry else tag, backend="ollama", ollama_tag=tag)


def pull_engines() -> list[str]:
    """The registered engines whose models :func:`pull` can fetch."""
    return [name for name in registry.names() if registry.get(name).capabilities.pulls_models]


def _pulling_engine(backend: str) -> str:
    """``backend`` by its registered name, refused unless the engine pulls models."""
    if backend.strip().lower() == "auto":
        return "auto"
    name = registry.get(backend).name
    if name not in pull_engines():
        raise InvalidRequestError(
            f"the {name} engine has no models to pull; pull works for auto, "
            + ", ".join(pull_engines())
        )
    return name


def download_gguf(
    entry: CatalogEntry,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    endpoint: str | None = None,
    revision: str | None = None,
    progress: bool = True,
) -> tuple[Path, Path]:
    """Both files of ``entry`` into the Hugging Face cache; their local paths.

    Files already cached are not fetched again. The Hub is asked once, quietly, whether
    it answers (:func:`hub_unreachable`); if not, cached files are returned as they are.
    Errors say what to do: a missing repository or file is a :class:`ModelNotFoundError`,
    an unreachable Hub with nothing cached a :class:`BackendUnavailableError` naming
    the address and why it failed.
    """
    if not entry.has_gguf:
        raise InvalidRequestError(f"{entry.name} has no GGUF files to download")
    hub = huggingface_hub()
    quiet = None if progress else _quiet_bar()
    # One quiet look first: huggingface_hub retries an unreachable Hub five times with
    # backoff (24 s of "Retrying in 1s [Retry 1/5]" lines) before failing. Unreachable,
    # only the cache is read, and the error names the address that did not answer.
    unreachable = None
    if not hub.constants.HF_HUB_OFFLINE:
        unreachable = hub_unreachable(endpoint or hub.constants.ENDPOINT)
    paths = []
    for filename in (str(entry.gguf), str(entry.mmproj)):
        try:
            path = hub.hf_hub_download(
                str(entry.hf_repo),
                filename,
                revision=revision,
                cache_dir=cache_dir,
                endpoint=endpoint,
                tqdm_class=quiet,
                local_files_only=unreachable is not None,
            )
        except LlavaLocalError:
            raise
        except Exception as exc:
            if unreachable is not None and isinstance(exc, hub.errors.LocalEntryNotFoundError):
                where = endpoint or hub.constants.ENDPOINT
                raise BackendUnavailableError(
                    f"cannot reach the Hugging Face Hub at {where} ({unreachable}), and "
                    f"{filename} of {entry.hf_repo} is not in the cache "
                    f"{hf_cache_dir(cache_dir)}: check the network (or HF_ENDPOINT), "
                    "then pull again"
                ) from None
            raise _hub_error(exc, entry, filename, endpoint, cache_dir) from exc
        paths.append(Path(cast(str, path)))
    return paths[0], paths[1]


def hub_unreachable(endpoint: str, *, timeout: float = 10.0) -> str | None:
    """Why the Hub at ``endpoint`` cannot be reached (one ``HEAD``, no retries, quiet),
    or None when it answers at all: any HTTP status counts as reachable."""
    try:
        with httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, 5.0))) as http:
            http.head(endpoint)
    except httpx.TransportError as exc:
        return _transport_reason(exc)
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
        return f"not a valid address: {exc}"
    return None


def _transport_reason(exc: httpx.TransportError) -> str:
    """A short reason for a failed connection: the innermost error's own words."""
    cause: BaseException = exc
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    text = str(cause) or str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer in time: {text}"
    return text


def _hub_error(
    exc: Exception,
    entry: CatalogEntry,
    filename: str,
    endpoint: str | None,
    cache_dir: str | os.PathLike[str] | None,
) -> Exception:
    """The library error for one ``huggingface_hub`` failure: the single place they are
    mapped. Anything unknown is returned as it is, and re-raised."""
    hub = huggingface_hub()
    errors = hub.errors
    where = endpoint or hub.constants.ENDPOINT
    repo = entry.hf_repo
    if isinstance(exc, errors.GatedRepoError):
        return ModelNotFoundError(
            f"{repo} is gated on the Hub: accept its terms on its page, then log in "
            "with `hf auth login`"
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        return ModelNotFoundError(f"the Hub at {where} has no repository {repo} (or it is private)")
    if isinstance(exc, errors.RevisionNotFoundError):
        return ModelNotFoundError(f"{repo} on {where} has no such revision: {exc}")
    if isinstance(exc, errors.EntryNotFoundError) and not isinstance(
        exc, errors.LocalEntryNotFoundError
    ):
        return ModelNotFoundError(
            f"{repo} on {where} has no file {filename}; the catalogue entry {entry.name} "
            "may be out of date"
        )
    if isinstance(exc, errors.LocalEntryNotFoundError):
        offline = " (HF_HUB_OFFLINE is set)" if hub.constants.HF_HUB_OFFLINE else ""
        return BackendUnavailableError(
            f"cannot reach the Hugging Face Hub at {where}{offline}, and {filename} of "
            f"{repo} is not in the cache {hf_cache_dir(cache_dir)}: check the network, "
            "HF_ENDPOINT or HF_HUB_OFFLINE, then pull again"
        )
    if isinstance(exc, errors.HfHubHTTPError):
        return BackendError(f"the Hub at {where} failed on {repo}/{filename}: {exc}")
    # The HTTP library's own base error (httpx2 in huggingface_hub 2.x): a transport
    # failure after the client's retries.
    if isinstance(exc, errors.HfHubHTTPError.__mro__[1]):
        return BackendUnavailableError(f"the download of {filename} from {where} failed: {exc}")
    if isinstance(exc, ValueError):
        return InvalidRequestError(f"cannot download {repo}/{filename}: {exc}")
    if isinstance(exc, OSError):
        return BackendError(
            f"the download of {filename} failed ({exc}); run the pull again (check free "
            f"disk space in {hf_cache_dir(cache_dir)})"
        )
    return exc


def _quiet_bar() -> Callable[..., Any]:
    """A progress-bar class for ``huggingface_hub`` that never draws."""
    from huggingface_hub.utils.tqdm import tqdm as hub_tqdm

    class Quiet(hub_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]  # tqdm

    return Quiet
