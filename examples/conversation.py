"""A conversation about one picture: the follow-up does not pay for the picture again.

python examples/conversation.py examples/digit.png
"""

import sys

from llava_local import VisionChat

with VisionChat.llama_cpp() as chat:  # the bundled demo model; pass model=/mmproj= for others
    first = chat.ask("What digit is this?", image=sys.argv[1], temperature=0)
    print(first.text, f"(pictures encoded: {first.stats.images_encoded})")
    again = chat.ask("Which digit is shown here?", temperature=0)
    print(
        again.text,
        f"(pictures encoded: {again.stats.images_encoded}, "
        f"tokens reused: {again.stats.cached_tokens})",
    )
