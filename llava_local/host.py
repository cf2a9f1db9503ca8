"""Facts about this machine that several parts need: physical cores, CPU flags and
model, the memory still available (cgroup limits included), and on a single-board
computer the board, its swap and whether its CPU is throttled. One place, so the
engine's thread count, the memory preflight, ``doctor`` and ``bench`` agree.

Functions that read ``/proc`` and ``/sys`` take ``root``, the file system root, so
tests (and ``make arm64-check``) can hand in a made-up board.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel, ConfigDict

__all__ = [
    "Board",
    "available_bytes",
    "board",
    "cpu_flags",
    "cpu_model",
    "physical_cores",
    "swap_bytes",
    "throttled",
    "throttled_reasons",
    "total_bytes",
]

_ROOT = Path("/")


def physical_cores(root: Path = _ROOT) -> int:
    """Physical cores this process may use, and of a big.LITTLE CPU only the big ones:
    llama.cpp slows down on hyper-threads, and a token waits for its slowest thread."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = list(range(os.cpu_count() or 1))
    big = _big_cpus(root, allowed)
    if big:
        return len(big)
    cores: set[tuple[str, str]] = set()
    try:
        physical = core = ""
        for line in (root / "proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "physical id":
                physical = value
            elif key == "core id":
                core = value
                cores.add((physical, core))
    except OSError:
        pass
    return max(1, min(len(allowed), len(cores) or len(allowed)))


def _big_cpus(root: Path, allowed: list[int]) -> list[int]:
    """The allowed CPUs of the highest ``cpu_capacity`` (ARM's sysfs), when CPUs differ
    in it (big.LITTLE: an RK3588's four Cortex-A76 beside four A55); else empty."""
    capacity = {}
    for cpu in allowed:
        try:
            capacity[cpu] = int(
                (root / f"sys/devices/system/cpu/cpu{cpu}/cpu_capacity").read_text()
            )
        except (OSError, ValueError):
            return []
    if len(set(capacity.values())) < 2:
        return []
    top = max(capacity.values())
    return [cpu for cpu, value in capacity.items() if value == top]


def cpu_flags(root: Path = _ROOT) -> frozenset[str]:
    """The CPU's feature flags as ``/proc/cpuinfo`` lists them (x86 ``flags``, ARM
    ``Features``); empty where there is no such file."""
    try:
        for line in (root / "proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def cpu_model(root: Path = _ROOT) -> str:
    """The CPU's name, for benchmark reports."""
    try:
        for line in (root / "proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --------------------------------------------------------------------- the board


class Board(BaseModel):
    """A single-board computer, as its device tree names it."""

    model_config = ConfigDict(frozen=True)

    model: str
    #: ``pi4`` or ``pi5`` for the Raspberry Pis :mod:`llava_local.devices` knows.
    device: str | None = None


# The device-tree names of the Raspberry Pis built on the Pi 4's and the Pi 5's chips.
_PI4 = re.compile(r"^Raspberry Pi (4 Model|400|Compute Module 4)")
_PI5 = re.compile(r"^Raspberry Pi (5 Model|500|Compute Module 5)")


def board(root: Path = _ROOT) -> Board | None:
    """The board the device tree names (``/proc/device-tree/model``), or None on a
    machine without one (a PC)."""
    for place in ("proc/device-tree/model", "sys/firmware/devicetree/base/model"):
        try:
            model = (root / place).read_bytes().replace(b"\0", b"").decode(errors="replace")
        except OSError:
            continue
        if model.strip():
            model = model.strip()
            device = "pi4" if _PI4.match(model) else "pi5" if _PI5.match(model) else None
            return Board(model=model, device=device)
    return None


def swap_bytes(root: Path = _ROOT) -> tuple[int, int] | None:
    """Swap space: (total, free) in bytes from ``/proc/meminfo``, or None."""
    found = _meminfo(root)
    if "SwapTotal" not in found or "SwapFree" not in found:
        return None
    return found["SwapTotal"], found["SwapFree"]


def _meminfo(root: Path) -> dict[str, int]:
    """``/proc/meminfo``'s sizes, in bytes."""
    found = {}
    try:
        for line in (root / "proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            words = rest.split()
            if words and words[0].isdigit():
                found[key] = int(words[0]) * (1024 if words[1:] == ["kB"] else 1)
    except OSError:
        return {}
    return found


#: The bits of a Raspberry Pi's ``get_throttled`` word (the firmware's documentation).
THROTTLE_BITS = {
    0: "under-voltage",
    1: "ARM frequency capped",
    2: "throttled",
    3: "soft temperature limit",
}


def throttled(root: Path = _ROOT, *, vcgencmd: bool = True) -> int | None:
    """A Raspberry Pi's ``get_throttled`` word: from the firmware's sysfs file, else from
    ``vcgencmd get_throttled`` (only on the real root); None where neither answers."""
    for path in sorted((root / "sys/devices/platform").glob("soc*/soc*:firmware/get_throttled")):
        try:
            return int(path.read_text().strip(), 16)
        except (OSError, ValueError):
            continue
    command = shutil.which("vcgencmd") if vcgencmd and root == _ROOT else None
    if command is None:
        return None
    try:
        done = subprocess.run(
            [command, "get_throttled"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"throttled=(0x[0-9a-fA-F]+)", done.stdout)
    return int(found[1], 16) if found else None


def throttled_reasons(word: int) -> tuple[list[str], list[str]]:
    """What ``word`` says: the conditions now (bits 0-3), and those since boot (16-19)."""
    now = [name for bit, name in THROTTLE_BITS.items() if word & (1 << bit)]
    since = [name for bit, name in THROTTLE_BITS.items() if word & (1 << (bit + 16))]
    return now, since


def total_bytes(root: Path = _ROOT) -> int | None:
    """Physical memory, in bytes, or None where the system does not say."""
    total = _meminfo(root).get("MemTotal")
    if total is not None or root != _ROOT:
        return total
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def available_bytes() -> int:
    """Memory this process can still use, in bytes.

    Linux: ``MemAvailable`` from ``/proc/meminfo``, capped by the cgroup's limit
    (v2 ``memory.max``, v1 ``memory.limit_in_bytes``, the tightest up the tree)
    less its usage (page cache the cgroup could drop, ``inactive_file``, counts as
    free). Elsewhere: psutil when installed, ``GlobalMemoryStatusEx`` on Windows,
    ``sysconf`` on other Unixes; when nothing can tell, no limit is assumed.
    """
    avail = _meminfo_available()
    if avail is not None:
        limit = _cgroup_available()
        return min(avail, limit) if limit is not None else avail
    for probe in (_psutil_available, _windows_available, _sysconf_available):
        found = probe()
        if found is not None:
            return found
    return sys.maxsize


def _meminfo_available(path: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in path.read_text().splitlines():
            key, _, rest = line.partition(":")
            if key == "MemAvailable":
                return int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available(root: Path = Path("/")) -> int | None:
    """Room left under this process's cgroup memory limits, if any is set.

    ``root`` is the file system root, so tests can hand in a made-up one.
    """
    proc = root / "proc/self"
    try:
        membership = (proc / "cgroup").read_text().splitlines()
        mounts = (proc / "mountinfo").read_text().splitlines()
    except OSError:
        return None
    best: int | None = None
    for directory, mount, names in _cgroup_dirs(membership, mounts, root):
        level = directory
        while True:  # a parent's limit applies too: keep the tightest
            room = _cgroup_room(level, *names)
            if room is not None:
                best = room if best is None else min(best, room)
            if level in (mount, level.parent):
                break
            level = level.parent
    return best


def _cgroup_room(directory: Path, limit_file: str, usage_file: str, inactive: str) -> int | None:
    limit = _read_int(directory / limit_file)
    if limit is None or limit >= 1 << 60:  # no file, "max", or v1's "unlimited"
        return None
    usage = _read_int(directory / usage_file) or 0
    droppable = _stat_value(directory / "memory.stat", inactive)
    return max(0, limit - max(0, usage - droppable))


def _cgroup_dirs(
    membership: list[str], mounts: list[str], root: Path
) -> list[tuple[Path, Path, tuple[str, str, str]]]:
    """(cgroup directory, its mount point, (limit file, usage file, memory.stat key))."""
    paths: dict[str, str] = {}
    for line in membership:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            paths["v2"] = parts[2]
        elif "memory" in parts[1].split(","):
            paths["v1"] = parts[2]
    found = []
    for line in mounts:
        left, _, right = line.partition(" - ")
        fields, extra = left.split(), right.split()
        if len(fields) < 5 or len(extra) < 3:
            continue
        mount_root, mount_point, fstype, options = fields[3], fields[4], extra[0], extra[2]
        if fstype == "cgroup2" and "v2" in paths:
            version, names = "v2", ("memory.max", "memory.current", "inactive_file")
        elif fstype == "cgroup" and "memory" in options.split(",") and "v1" in paths:
            version = "v1"
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        mount = root / mount_point.lstrip("/")
        relative = os.path.relpath(paths[version], mount_root)
        directory = mount if relative.startswith("..") else mount / relative
        if not directory.is_dir():
            directory = mount  # a container that shows its own cgroup as the root
        found.append((directory, mount, names))
    return found


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return 1 << 62
    try:
        return int(text)
    except ValueError:
        return None


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _psutil_available() -> int | None:
    try:
        import psutil  # type: ignore[import-untyped]
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _windows_available() -> int | None:
    if sys.platform != "win32":
        return None
    import ctypes

    class _Status(ctypes.Structure):
        _fields_ = [
            ("dwLength", ctypes.c_ulong),
            ("dwMemoryLoad", ctypes.c_ulong),
            ("ullTotalPhys", ctypes.c_ulonglong),
            ("ullAvailPhys", ctypes.c_ulonglong),
            ("ullTotalPageFile", ctypes.c_ulonglong),
            ("ullAvailPageFile", ctypes.c_ulonglong),
            ("ullTotalVirtual", ctypes.c_ulonglong),
            ("ullAvailVirtual", ctypes.c_ulonglong),
            ("ullAvailExtendedVirtual", ctypes.c_ulonglong),
        ]

    status = _Status()
    status.dwLength = ctypes.sizeof(_Status)
    kernel32 = getattr(ctypes, "windll").kernel32  # noqa: B009 - only on Windows
    if not kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
        return None
    return int(status.ullAvailPhys)


def _sysconf_available() -> int | None:
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None
