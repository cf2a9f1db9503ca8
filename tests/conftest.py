"""Fixtures shared by the test modules: the stand-in Ollama daemon and tiny GGUF pairs."""

from .gguf_fixtures import tiny_mtmd, tiny_pair, tiny_pair_q4
from .ollama_server import closed_port, ollama_server

__all__ = ["closed_port", "ollama_server", "tiny_mtmd", "tiny_pair", "tiny_pair_q4"]
