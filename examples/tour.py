"""The README's short tour, with the bundled demo model (run it from the repository).

python examples/tour.py
"""

from llava_local import VisionChat

with VisionChat.llama_cpp(temperature=0) as chat:  # the bundled demo model
    reply = chat.ask("What shape is this?", image="examples/shape.png")
    print(reply.text, f"({reply.stats.total_s:.2f} s)")  # It is a triangle. (0.03 s)

    for piece in chat.stream("What colour is it?"):  # same picture, follow-up turn
        print(piece, end="", flush=True)  # It is red.
    print()

    history = chat.history  # [Message(role="user", ...), Message(role="assistant", ...), ...]
    chat.save("talk.json")  # pictures included, written atomically
    chat.reset()  # a new conversation, for the next picture
    print(chat.ask("What digit is this?", image="examples/digit.png").text)  # This digit is 7.
