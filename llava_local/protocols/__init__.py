"""The wire protocols the library speaks, one module each, used by both sides.

:mod:`.ollama` and :mod:`.openai` hold each protocol's shapes (pydantic models of its
requests, answers, stream chunks, errors and model listings) and the translations
between them and the library's own types (:class:`~llava_local.types.Options` to and
from the protocol's option names, :class:`~llava_local.types.Stats` to and from its
counters). The engine that talks to such a server (``backends/ollama.py``,
``backends/openai.py``) and the server that answers in it (``apps/serve/``) both use
them, so a field is named, and a figure converted, in one place.

Strict in, lenient out: a request's known fields are checked; fields the library does
not use are ignored, so a newer client or server never breaks parsing. Nothing here
does I/O or imports an engine, an application or the CLI.
"""
