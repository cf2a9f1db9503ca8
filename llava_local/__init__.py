"""llava-local: talk with LLaVA-style vision-language models on ordinary CPUs.

One class, :class:`VisionChat`, drives the Ollama daemon or llama.cpp in this
process with the same code::

    from llava_local import VisionChat

    with VisionChat(backend="auto") as chat:
        print(chat.ask("What is in this picture?", image="photo.jpg"))
        for piece in chat.stream("And the colours?"):
            print(piece, end="")
"""

from importlib.metadata import PackageNotFoundError, version

from .aio import AsyncReplyStream, AsyncVisionChat
from .backends import Backend, Finish, Turn
from .chat import VisionChat
from .control import TurnControl
from .errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    ContextOverflowError,
    ConversationFileError,
    EnginePluginWarning,
    ImageError,
    InsufficientMemoryError,
    InvalidRequestError,
    LlavaLocalError,
    MissingDependencyError,
    ModelLoadError,
    ModelNotFoundError,
    NoPictureWarning,
    NotAVisionModelError,
    OutputFileError,
    ResponseError,
    SchemaError,
    TurnCancelledError,
)
from .images import ImageSource
from .persist import ColdResumeWarning
from .stream import ReplyStream
from .types import (
    Message,
    Options,
    PreparedImage,
    Reply,
    Stats,
    TokenLogprob,
    Tool,
    ToolCall,
)

try:
    __version__ = version("llava-local")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "AsyncReplyStream",
    "AsyncVisionChat",
    "Backend",
    "BackendError",
    "BackendTimeoutError",
    "BackendUnavailableError",
    "ColdResumeWarning",
    "ContextOverflowError",
    "ConversationFileError",
    "EnginePluginWarning",
    "Finish",
    "ImageError",
    "ImageSource",
    "InsufficientMemoryError",
    "InvalidRequestError",
    "LlavaLocalError",
    "Message",
    "MissingDependencyError",
    "ModelLoadError",
    "ModelNotFoundError",
    "NoPictureWarning",
    "NotAVisionModelError",
    "Options",
    "OutputFileError",
    "PreparedImage",
    "Reply",
    "ReplyStream",
    "ResponseError",
    "SchemaError",
    "Stats",
    "TokenLogprob",
    "Tool",
    "ToolCall",
    "Turn",
    "TurnCancelledError",
    "TurnControl",
    "VisionChat",
    "__version__",
]
