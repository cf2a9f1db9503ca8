"""Get an answer as a validated pydantic object.

python examples/structured_answer.py examples/digit.png
"""

import sys

from pydantic import BaseModel

from llava_local import VisionChat


class Digit(BaseModel):
    digit: int


with VisionChat.llama_cpp() as chat:
    reply = chat.ask(
        "What digit is this? Answer in JSON.",
        image=sys.argv[1],
        schema=Digit,
        temperature=0,
        max_tokens=32,
    )
    print(repr(reply.parsed))
