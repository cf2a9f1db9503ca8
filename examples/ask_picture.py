"""Ask one question about a picture, with whichever engine is available.

python examples/ask_picture.py [PICTURE [QUESTION]]
(default: digit.png beside this script, "What digit is this?")
"""

import sys
from pathlib import Path

from llava_local import VisionChat

image = sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("digit.png")
prompt = sys.argv[2] if len(sys.argv) > 2 else "What digit is this?"
with VisionChat(backend="auto") as chat:
    for piece in chat.stream(prompt, image=image, temperature=0):
        print(piece, end="", flush=True)
    print()
    stats = chat.last_reply.stats if chat.last_reply else None
    if stats:
        print(f"[{chat.backend}:{chat.model}] {stats.total_s:.2f} s", file=sys.stderr)
