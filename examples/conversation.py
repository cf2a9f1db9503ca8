"""A conversation about one picture: the follow-up does not pay for the picture again.

python examples/conversation.py [PICTURE]    (default: digit.png beside this script)
"""

import sys
from pathlib import Path

from llava_local import VisionChat

picture = sys.argv[1] if len(sys.argv) > 1 else Path(__file__).with_name("digit.png")
with VisionChat.llama_cpp() as chat:  # the bundled demo model; pass model=/mmproj= for others
    first = chat.ask("What digit is this?", image=picture, temperature=0)
    print(first.text, f"(pictures encoded: {first.stats.images_encoded})")
    again = chat.ask("Which digit is shown here?", temperature=0)
    print(
        again.text,
        f"(pictures encoded: {again.stats.images_encoded}, "
        f"tokens reused: {again.stats.cached_tokens})",
    )
