"""A llava-local engine from another package: it answers with the question (in
capitals with ``shout=True``, the command line's ``--shout``) and the number of
pictures it was given, so a test can see both arrive."""

from __future__ import annotations

from collections.abc import Generator

from llava_local.backends import Backend, Finish, Turn
from llava_local.backends.spec import Capabilities, EngineConfig, EngineSpec, setting
from llava_local.types import Stats


class MirrorConfig(EngineConfig):
    """The mirror engine's settings."""

    model: str | None = "mirror-1"
    shout: bool = setting(False, help="Answer in capitals", flag="--shout")


class MirrorEngine(Backend):
    """Answers with the question and how many pictures the conversation holds."""

    name = "mirror"

    def __init__(self, config: MirrorConfig) -> None:
        self.config = config
        self.model = config.model or "mirror-1"

    def generate(self, turn: Turn) -> Generator[str | Finish, None, None]:
        question = turn.messages[-1].content
        pictures = sum(len(message.images) for message in turn.messages)
        shout = isinstance(self.config, MirrorConfig) and self.config.shout
        yield f"{question.upper() if shout else question} [{pictures} picture(s)]"
        yield Finish("stop", Stats(prompt_tokens=len(question.split()), completion_tokens=1))


SPEC = EngineSpec(
    name="mirror",
    config=MirrorConfig,
    open=MirrorEngine,
    capabilities=Capabilities(json_schema=False),
    description="answers with the question (a test plugin)",
)
