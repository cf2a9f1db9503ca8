"""Ask one question about a picture, with whichever engine is available.

python examples/ask_picture.py examples/digit.png "What digit is this?"
"""

import sys

from llava_local import VisionChat

image, prompt = sys.argv[1], sys.argv[2]
with VisionChat(backend="auto") as chat:
    for piece in chat.stream(prompt, image=image, temperature=0):
        print(piece, end="", flush=True)
    print()
    stats = chat.last_reply.stats if chat.last_reply else None
    if stats:
        print(f"[{chat.backend}:{chat.model}] {stats.total_s:.2f} s", file=sys.stderr)
