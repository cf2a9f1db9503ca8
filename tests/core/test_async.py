"""AsyncVisionChat: the sync core driven from asyncio, with the same guarantees."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from llava_local import (
    AsyncReplyStream,
    AsyncVisionChat,
    BackendUnavailableError,
    InvalidRequestError,
    Message,
    TurnCancelledError,
    VisionChat,
)
from llava_local.control import STATUS_ANSWERING, STATUS_ENCODING, STATUS_PREPARING, TurnControl
from llava_local.images import prepare

from ..gguf_fixtures import GgufPair, png_bytes
from ..ollama_server import OllamaServer, Script
from ..paths import DIGIT

QUESTION = "What digit is this?"


def test_ask_and_async_for_over_ollama(ollama_server: OllamaServer) -> None:
    """await ask() and async-for streaming answer and build one conversation."""
    ollama_server.script(Script(pieces=["A ", "dog."]), Script(pieces=["Brown", "."]))

    async def main() -> tuple[str, list[str]]:
        async with AsyncVisionChat.ollama(host=ollama_server.url) as chat:
            reply = await chat.ask("What?", image=png_bytes(seed=1))
            pieces = [p async for p in chat.stream("Colour?")]
            assert len(chat.history) == 4
            return reply.text, pieces

    text, pieces = asyncio.run(main())
    assert text == "A dog."
    assert pieces == ["Brown", "."]


def test_leaving_early_keeps_nothing_and_frees_the_chat(tiny_pair: GgufPair) -> None:
    """Breaking out of an async stream stops the engine; the turn is not kept; the next works."""

    async def main() -> tuple[int, str]:
        chat = AsyncVisionChat.llama_cpp(tiny_pair.lm, mmproj=tiny_pair.mmproj)
        async with chat:
            async with chat.stream("What?", image=png_bytes(seed=2), temperature=0) as s:
                async for _ in s:
                    break
            kept = len(chat.history)
            reply = await chat.ask("What?", image=png_bytes(seed=2), temperature=0, max_tokens=4)
            return kept, reply.text

    kept, text = asyncio.run(main())
    with VisionChat.llama_cpp(tiny_pair.lm, mmproj=tiny_pair.mmproj) as sync:
        expected = sync.ask("What?", image=png_bytes(seed=2), temperature=0, max_tokens=4).text
    assert kept == 0
    assert text == expected


def test_concurrent_coroutines_are_serialised(tiny_pair: GgufPair) -> None:
    """Several coroutines asking one chat at once each get a whole turn, in some order."""

    async def main() -> list[str]:
        async with AsyncVisionChat.llama_cpp(tiny_pair.lm, mmproj=tiny_pair.mmproj) as chat:
            await chat.ask("Look.", image=png_bytes(seed=3), temperature=0, max_tokens=3)
            await asyncio.gather(
                *(chat.ask(f"q{i}", temperature=0, max_tokens=3) for i in range(4))
            )
            return [m.role for m in chat.history]

    assert asyncio.run(main()) == ["user", "assistant"] * 5


def test_errors_arrive_as_library_errors(closed_port: int) -> None:
    """An engine failure inside the worker thread is raised in the coroutine."""

    async def main() -> None:
        async with AsyncVisionChat.ollama(host=f"127.0.0.1:{closed_port}") as chat:
            await chat.ask("Hi")

    with pytest.raises(BackendUnavailableError, match="ollama serve"):
        asyncio.run(main())


def test_the_event_loop_stays_free_while_the_engine_works(ollama_server: OllamaServer) -> None:
    """Other coroutines run while an answer trickles in from the engine."""
    ollama_server.script(Script(pieces=["a", "b", "c", "d"], piece_delay_s=0.05))

    async def main() -> int:
        ticks = 0
        done = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.005)

        async with AsyncVisionChat.ollama(host=ollama_server.url) as chat:
            task = asyncio.create_task(ticker())
            await chat.ask("Hi")
            done.set()
            await task
        return ticks

    assert asyncio.run(main()) > 3


# --- cancelling a turn ----------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_timed_out_ask_against_a_slow_daemon_leaves_the_chat_usable(
    ollama_server: OllamaServer,
) -> None:
    """After asyncio.wait_for times out an ask against a slow daemon, the turn is not kept,
    the engine stopped reading the answer, and the next ask and aclose() work."""
    slow = Script(pieces=["word "] * 300, piece_delay_s=0.1)
    ollama_server.script(Script(pieces=["First", "."]), slow, Script(pieces=["Fine", "."]))

    async def main() -> tuple[list[str], str, list[str]]:
        chat = AsyncVisionChat.ollama(host=ollama_server.url)
        await chat.ask("What?", image=png_bytes(seed=1))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(chat.ask("Tell me everything."), 0.5)
        kept = [m.content for m in chat.history]
        reply = await chat.ask("Short?")
        await chat.aclose()
        return kept, reply.text, [m.content for m in chat.history]

    kept, text, history = asyncio.run(main())
    assert kept == ["What?", "First."]
    assert text == "Fine."
    assert history == ["What?", "First.", "Short?", "Fine."]
    assert ollama_server.client_gone.wait(10)  # the slow answer was hung up on


def hold_until_cancelled(control: TurnControl) -> None:
    """Block (at most 30 s) until the turn of ``control`` is asked to stop."""
    for _ in range(3000):
        if control.cancelled:
            return
        time.sleep(0.01)


@pytest.fixture(scope="module")
def demo_answer() -> str:
    """The demo model's greedy answer about examples/digit.png, from a fresh sync chat."""
    with VisionChat.llama_cpp(temperature=0) as chat:
        return chat.ask(QUESTION, image=DIGIT).text


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["wait_for", "task.cancel", "aclose"])
def test_cancelling_stops_the_demo_engine_in_the_middle_of_an_encoding(
    how: str, demo_answer: str
) -> None:
    """Cancelling an async turn (wait_for timing out, task.cancel(), closing the stream)
    while the demo engine encodes the picture cancels the stream, which stops the
    encoding; nothing is kept and the next ask answers as a fresh chat does."""

    async def read_all(stream: AsyncReplyStream) -> str:
        return "".join([piece async for piece in stream])

    async def main() -> tuple[str, list[object], str, int | None]:
        loop = asyncio.get_running_loop()
        encoding = asyncio.Event()
        streams: list[AsyncReplyStream] = []

        def on_status(status: str) -> None:  # in the turn's worker thread
            if status == STATUS_ENCODING:
                loop.call_soon_threadsafe(encoding.set)
                hold_until_cancelled(streams[0].control)  # the encoding waits for the cancel

        chat = AsyncVisionChat.llama_cpp(temperature=0, on_status=on_status)
        streams.append(chat.stream(QUESTION, image=DIGIT))
        chat.on_status = None  # later turns are not held
        stream = streams[0]
        if how == "wait_for":
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(read_all(stream), 0.5)
        else:
            reader = asyncio.create_task(read_all(stream))
            await encoding.wait()
            if how == "task.cancel":
                reader.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await reader
            else:
                await stream.aclose()
                with pytest.raises(TurnCancelledError):
                    await reader
        kept: list[object] = list(chat.history)
        reply = await chat.ask(QUESTION, image=DIGIT)
        await chat.aclose()
        return stream.status, kept, reply.text, reply.stats.images_encoded

    status, kept, text, encoded = asyncio.run(main())
    assert status == STATUS_ENCODING  # stopped there: it never got to answering
    assert status != STATUS_ANSWERING
    assert kept == []
    assert text == demo_answer
    assert encoded == 1


@pytest.mark.timeout(60)
def test_a_task_cannot_start_a_second_turn_while_it_reads_one(
    ollama_server: OllamaServer,
) -> None:
    """Asking again inside an `async for` over a turn of the same chat raises
    InvalidRequestError instead of waiting for itself forever; the first turn is kept."""
    ollama_server.script(Script(pieces=["A ", "dog."]))

    async def main() -> tuple[list[str], list[str]]:
        pieces: list[str] = []
        async with AsyncVisionChat.ollama(host=ollama_server.url) as chat:
            async with chat.stream("What?", image=png_bytes(seed=1)) as stream:
                async for piece in stream:
                    with pytest.raises(InvalidRequestError, match="finish that stream"):
                        await chat.ask("Interleaved?")
                    pieces.append(piece)
            return pieces, [m.content for m in chat.history]

    pieces, history = asyncio.run(main())
    assert pieces == ["A ", "dog."]
    assert history == ["What?", "A dog."]


# --- pictures off the event loop, and the sync surface ---------------------------------


@contextlib.contextmanager
def picture_server(body: bytes, *, hold: threading.Event) -> Iterator[tuple[str, list[bool]]]:
    """An HTTP server with one picture, which holds each download until ``hold`` is set
    (at most 10 s); yields its URL and, per download, whether ``hold`` was set in time."""
    served: list[bool] = []
    requested = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requested.set()
            served.append(hold.wait(10))
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Stay quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02})
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/picture.png", served
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def test_a_picture_is_downloaded_off_the_event_loop(ollama_server: OllamaServer) -> None:
    """A picture given as a URL is downloaded in the turn's worker thread: the event loop
    runs while the download waits, and the picture reaches the engine."""
    picture = png_bytes(seed=6)
    loop_ran = threading.Event()

    async def read_all(stream: AsyncReplyStream) -> str:
        return "".join([piece async for piece in stream])

    async def main(url: str) -> str:
        async with AsyncVisionChat.ollama(host=ollama_server.url) as chat:
            reader = asyncio.create_task(read_all(chat.stream("What?", image=url)))
            await asyncio.sleep(0)  # the reader hands the turn to its worker thread
            loop_ran.set()  # only reached if the download does not block the loop
            return await reader

    with picture_server(picture, hold=loop_ran) as (url, served):
        text = asyncio.run(main(url))
    assert served == [True]
    assert text == "A cat on a mat."
    sent = ollama_server.requests_to("/api/chat")[-1].json["messages"][-1]["images"]
    assert len(sent) == 1
    assert base64.b64decode(sent[0])[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_async_chat_offers_the_sync_surface(
    ollama_server: OllamaServer, tmp_path: Path
) -> None:
    """System prompt, options, on_status, allow_text_only, last_reply, reset, save, restore
    and load work on AsyncVisionChat as they do on VisionChat."""
    ollama_server.script(Script(pieces=["A ", "dog."]), Script(pieces=["Brown", "."]))
    statuses: list[str] = []

    async def main() -> tuple[list[str], list[str], list[str], str | None]:
        chat = AsyncVisionChat.ollama(host=ollama_server.url, system="Be brief.", temperature=0.5)
        chat.on_status = statuses.append
        chat.allow_text_only = True
        assert (chat.system, chat.options.temperature) == ("Be brief.", 0.5)
        assert (chat.allow_text_only, chat.has_pictures) == (True, False)
        reply = await chat.ask("What?", image=png_bytes(seed=1))
        assert chat.last_reply == reply
        assert chat.has_pictures
        path = await chat.save(tmp_path / "talk.json")
        chat.reset()
        after_reset = [m.content for m in chat.history]
        assert chat.last_reply is None
        chat.system = "Say more."
        await chat.restore(path)
        restored = [m.content for m in chat.history]
        await chat.aclose()
        loaded = await asyncio.to_thread(AsyncVisionChat.load, path, host=ollama_server.url)
        async with loaded:
            await loaded.ask("Colour?")
            return after_reset, restored, [m.content for m in loaded.history], loaded.system

    after_reset, restored, history, system = asyncio.run(main())
    assert statuses[0] == STATUS_PREPARING
    assert after_reset == []
    assert restored == ["What?", "A dog."]
    assert history == ["What?", "A dog.", "Colour?", "Brown."]
    assert system == "Be brief."
    first, last = (r.json for r in ollama_server.requests_to("/api/chat")[-2:])
    assert first["messages"][0] == {"role": "system", "content": "Be brief."}
    assert first["options"]["temperature"] == 0.5
    assert last["messages"][0] == {"role": "system", "content": "Be brief."}
    assert last["options"]["temperature"] == 0.5


def test_answer_takes_a_whole_conversation_and_keeps_nothing() -> None:
    """AsyncVisionChat.answer answers the last message of a conversation given whole (as
    VisionChat.answer does for the server), runs the turn in its worker thread, and
    leaves the chat's own history empty."""
    digit = Message(role="user", content=QUESTION, images=(prepare(DIGIT, max_side=1344),))

    async def main() -> tuple[str, str, list[Message], set[str]]:
        threads: set[str] = set()

        def status(text: str) -> None:
            threads.add(threading.current_thread().name)

        async with AsyncVisionChat.llama_cpp(on_status=status) as chat:
            stream = chat.answer([digit], temperature=0)
            streamed = "".join([piece async for piece in stream])
            again = chat.answer([digit, Message(role="assistant", content=streamed), digit])
            await again.aclose()  # left unread: nothing is kept either
            return streamed, stream.reply.text, chat.history, threads

    streamed, text, history, threads = asyncio.run(main())
    assert streamed == text == "This digit is 7."
    assert history == []
    assert threads
    assert all(name.startswith("llava-local-turn") for name in threads)
