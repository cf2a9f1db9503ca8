"""``llava-local serve``: one engine behind HTTP, for programs that speak OpenAI or Ollama.

Routes (FastAPI, served by uvicorn; ``pip install 'llava-local[serve]'``):

* OpenAI-compatible: ``POST /v1/chat/completions`` (server-sent events with
  ``"stream": true``), ``GET /v1/models``, ``GET /v1/models/{id}``;
* Ollama-compatible: ``POST /api/chat`` and ``POST /api/generate`` (NDJSON stream
  unless ``"stream": false``), ``GET /api/tags``, ``POST /api/show``,
  ``GET /api/version``, ``GET /api/ps``;
* ``GET /health`` (never behind the API key) and ``GET``/``HEAD /``.

How a chat request flows, module by module:

1. :mod:`.middleware` logs it (one line at its end), checks its ``Host`` header (DNS
   rebinding), answers CORS preflights, and checks the API key; :mod:`.app` routes it
   to :mod:`.openai_api` or :mod:`.ollama_api`.
2. The protocol module reads the body (:mod:`.bodies`: ``application/json`` only,
   size and nesting limits, its pydantic model), checks the model name, and turns the
   messages into the protocol-neutral :class:`~.pictures.Wanted` (role, text, pictures
   as sent), its options and schema into the chat's.
3. :func:`.turns.respond` checks the schema's cost, downloads the pictures given as
   http(s) URLs when ``Limits.picture_urls`` allows it (:mod:`.downloads`: public
   addresses only, in the event loop, before it queues), admits it to the queue (503
   with ``Retry-After`` when full), reads and prepares its pictures in a worker thread
   (:mod:`.pictures`: data URIs, base64, downloaded bytes; never a path on this
   machine), waits for the model (one turn at a time), and reads the answer's first
   piece before any status is sent, so an early error gets its own status.
4. Both protocols are stateless: each request resends the whole conversation, and
   :meth:`VisionChat.answer` on the ONE shared chat lets the llama.cpp engine's
   token-by-token prefix match (pictures by content hash) read only what is new.
   ``usage.prompt_tokens_details.cached_tokens`` (OpenAI) and ``prompt_eval_count``
   (Ollama: the tokens evaluated) say so.
5. The protocol module writes the answer, whole or streamed; a client that hangs up
   cancels its turn and frees the model for the next request.

Errors have each protocol's shape and status, never a traceback (:mod:`.errors`).
:func:`serve` (:mod:`.server`) runs the app under uvicorn until Ctrl-C.
"""

from __future__ import annotations

from .app import check_installed, create_app
from .downloads import HostPort
from .limits import MB, Limits
from .server import capacity, serve

__all__ = ["MB", "HostPort", "Limits", "capacity", "check_installed", "create_app", "serve"]
