"""Get an answer as a validated pydantic object.

python examples/structured_answer.py [PICTURE]    (default: digit.png beside this script)

The field's type says what a digit is: an int from 0 to 9. llama.cpp's grammar then
allows only those ten answers, and the answer is validated against the model as well.
"""

import sys
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field

from llava_local import VisionChat


class Digit(BaseModel):
    digit: Annotated[int, Field(ge=0, le=9)]


picture = sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("digit.png")
with VisionChat.llama_cpp() as chat:  # the bundled demo model
    reply = chat.ask("What digit is this?", image=picture, schema=Digit, temperature=0)
    print(repr(reply.parsed))  # Digit(digit=7)
