"""The web page (``llava-local ui``), served for real and driven in headless Chromium.

Why this way: the page is only worth something if a browser can use it, so each test
starts the command in a subprocess on a free port of 127.0.0.1 and works the page the
way a person does (upload, type, Enter, read the screen) through Playwright, with
Debian's Chromium and its background networking switched off. Every request the page
makes is recorded: none may leave 127.0.0.1, because the page must work offline.

Needs Debian's ``chromium`` (``make chromium``) and the ``ui`` and ``dev`` extras (gradio,
playwright): without them these tests fail (playwright is imported plainly; a missing
Chromium is named with what to install), never skip. Never ``playwright install``:
it downloads a browser of its own. Screenshots land in ``test-artifacts/``.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import Image
from playwright.sync_api import Browser, Error, Page, sync_playwright

from ..ollama_server import OllamaServer, Script, free_port
from ..paths import ROOT
from ..ui_process import Served, serve_page

CHROMIUM = os.environ.get("LLAVA_LOCAL_CHROMIUM", "/usr/bin/chromium")
# What this machine's Chromium needs to run headless, as root, with no network: the
# background-networking flags stop it calling Google at every start. Playwright gives
# each launch a fresh, empty profile directory (its own --user-data-dir).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
INSTALL = (
    "install Debian's Chromium (apt-get install -y chromium) and the extras "
    "(pip install -e '.[ui,dev]': gradio, playwright); do not run `playwright install`"
)
ARTIFACTS = ROOT / "test-artifacts"
ANSWER_TIMEOUT_MS = 120_000  # the demo model on a busy CPU, with CLIP on first use
STEP_TIMEOUT_MS = 30_000
DIGIT_INDEX = 1422  # a test-split digit (>= 1400, never trained on) the demo reads
DIGIT_LABEL = 7


# --- the browser -------------------------------------------------------------------


@dataclass
class Tab:
    """One browser tab on the page, with every address it asked for."""

    page: Page
    requested: list[str] = field(default_factory=list)

    def foreign_requests(self, served: Served) -> list[str]:
        """Requests that left the page's own server (data: and blob: are local)."""
        own = urlsplit(served.url).netloc
        return [
            url
            for url in self.requested
            if urlsplit(url).scheme not in ("data", "blob") and urlsplit(url).netloc != own
        ]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Debian Chromium through Playwright; fails, saying what to install, if it is
    missing."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"no Chromium at {CHROMIUM}: {INSTALL}")
    with sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(
                executable_path=CHROMIUM, args=CHROMIUM_FLAGS, timeout=60_000
            )
        except Error as exc:
            pytest.fail(f"Chromium at {CHROMIUM} did not start ({exc}): {INSTALL}")
        try:
            yield chromium
        finally:
            chromium.close()


@contextlib.contextmanager
def open_tab(browser: Browser, served: Served) -> Iterator[Tab]:
    """A fresh browser context (so a fresh page session) on the served page."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(STEP_TIMEOUT_MS)
    tab = Tab(context.new_page())
    tab.page.on("request", lambda request: tab.requested.append(request.url))
    try:
        tab.page.goto(served.url)
        tab.page.locator("#llava-question textarea").wait_for()
        yield tab
        assert not tab.foreign_requests(served), "the page reached outside 127.0.0.1"
    finally:
        context.close()


def upload(tab: Tab, picture: Path) -> None:
    """Put a picture in the picture box and wait until the page shows it."""
    tab.page.locator("#llava-picture input[type=file]").set_input_files(str(picture))
    tab.page.locator("#llava-picture img").first.wait_for()


def ask(tab: Tab, question: str) -> None:
    """Type a question and press Enter."""
    box = tab.page.locator("#llava-question textarea")
    box.fill(question)
    box.press("Enter")


def fill_setting(tab: Tab, elem_id: str, value: str) -> None:
    """Type into a box in the engine panel. Gradio mounts a closed accordion's
    children lazily (gradio-app/gradio#12906), so a box filled while its component is
    still loading can be mounted again with the old value (the page keeps a live
    connection, so "network idle" never comes): fill, let it settle, and fill again
    until the value holds."""
    box = tab.page.locator(f"#{elem_id} input, #{elem_id} textarea").first
    for _ in range(5):
        box.fill(value)
        tab.page.wait_for_timeout(500)
        if box.input_value() == value:
            return
    raise AssertionError(f"#{elem_id} does not keep the value {value!r}")


def bot_texts(tab: Tab) -> list[str]:
    """The model's messages on screen, oldest first."""
    texts: list[str] = tab.page.locator("#llava-chat .bot.message").all_inner_texts()
    return [text.strip() for text in texts]


def wait_for_bot_text(tab: Tab, text: str, timeout_ms: int = STEP_TIMEOUT_MS) -> None:
    """Wait until the conversation on screen shows ``text`` in an answer."""
    from playwright.sync_api import expect

    expect(tab.page.locator("#llava-chat .bot.message").last).to_contain_text(
        text, timeout=timeout_ms
    )


def wait_for_turn(tab: Tab, timeout_ms: int = STEP_TIMEOUT_MS) -> None:
    """Wait until an answer (or an error) is on screen and the page no longer answers."""
    tab.page.wait_for_function(
        """() => document.querySelectorAll('#llava-chat .bot.message').length > 0
            && !document.querySelector('#llava-status').innerText.includes('answering')""",
        timeout=timeout_ms,
    )


def screenshot(tab: Tab, name: str) -> Path:
    """Keep a picture of the whole page as a test artefact."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    tab.page.screenshot(path=str(path), full_page=True)
    return path


@pytest.fixture(scope="module")
def digit_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A handwritten 7 from the test split, dark ink on light paper, 128 pixels square,
    drawn by the package's built-in digits set as the demo model's training draws them."""
    from llava_local.apps.datasets import load_set

    pictures = load_set("digits", limit=DIGIT_INDEX - 1400 + 1, size=128)
    digit = next(p for p in pictures if p.name == f"digits/{DIGIT_INDEX}")
    assert digit.label == str(DIGIT_LABEL)
    assert isinstance(digit.source, Image.Image)
    path = tmp_path_factory.mktemp("pictures") / "digit.png"
    digit.source.save(path)
    return path


def test_without_gradio_the_page_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without Gradio, building the page raises MissingDependencyError naming the extra."""
    from llava_local.apps import ui
    from llava_local.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "gradio", None)  # makes `import gradio` fail
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "True")  # restored after the test
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "0")
    with pytest.raises(MissingDependencyError, match=r"pip install 'llava-local\[ui\]'"):
        ui.build_app()


# --- with the stand-in Ollama daemon ---------------------------------------------------


@pytest.fixture(scope="module")
def ollama_page(
    ollama_daemon: OllamaServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """The page, starting on the stand-in daemon."""
    with serve_page(
        tmp_path_factory.mktemp("ui-ollama"), "--backend", "ollama", "--host", ollama_daemon.host
    ) as served:
        yield served


def test_answers_stream_with_timings_and_a_new_conversation_starts_clean(
    browser: Browser, ollama_page: Served, ollama_daemon: OllamaServer, digit_png: Path
) -> None:
    """An answer streams onto the page with its timings, a follow-up keeps the picture
    in the conversation without sending it again, and New conversation starts over."""
    ollama_daemon.script(
        Script(pieces=["A ", "hand", "written ", "seven."], piece_delay_s=0.8),
        Script(pieces=["It is ", "black ", "on white."], prompt_eval_count=41),
    )
    before = len(ollama_daemon.requests_to("/api/chat"))
    with open_tab(browser, ollama_page) as tab:
        upload(tab, digit_png)
        ask(tab, "What digit is this?")
        # Part of the answer is on screen while the rest is still being written.
        tab.page.wait_for_function(
            """() => {
                const bots = document.querySelectorAll('#llava-chat .bot.message');
                const text = bots.length ? bots[bots.length - 1].innerText : '';
                return text.includes('hand') && !text.includes('seven');
            }"""
        )
        wait_for_bot_text(tab, "A handwritten seven.")
        stats = tab.page.locator("#llava-stats")
        assert "prompt tokens" in stats.inner_text()

        ask(tab, "What colours are there?")
        wait_for_bot_text(tab, "It is black on white.")
        from playwright.sync_api import expect

        expect(stats).to_contain_text("41")
        assert bot_texts(tab) == ["A handwritten seven.", "It is black on white."]
        screenshot(tab, "ui-ollama-conversation.png")

        first, second = (r.json for r in ollama_daemon.requests_to("/api/chat")[before:])
        sent = base64.b64decode(first["messages"][-1]["images"][0])
        assert sent.startswith(b"\x89PNG") or sent[:2] == b"\xff\xd8"
        assert [bool(m.get("images")) for m in second["messages"] if m["role"] == "user"] == [
            True,
            False,
        ]

        tab.page.locator("#llava-new").click()
        expect(tab.page.locator("#llava-chat .bot.message")).to_have_count(0)
        expect(stats).to_contain_text("none yet")
        ask(tab, "What digit is this?")
        wait_for_bot_text(tab, "It is black on white.")
        again = ollama_daemon.requests_to("/api/chat")[-1].json
        assert [m["role"] for m in again["messages"]] == ["user"]
        assert again["messages"][0].get("images"), "the picture goes again after a reset"


def test_stop_ends_the_answer_and_leaves_it_out(
    browser: Browser, ollama_page: Served, ollama_daemon: OllamaServer
) -> None:
    """Stop hangs up on the engine mid-answer and takes the unfinished answer off the
    page, since the conversation does not keep it either."""
    from playwright.sync_api import expect

    ollama_daemon.script(pieces=["One ", "piece ", "at ", "a ", "time."], piece_delay_s=1.0)
    ollama_daemon.client_gone.clear()
    with open_tab(browser, ollama_page) as tab:
        ask(tab, "Tell me slowly.")
        wait_for_bot_text(tab, "One")
        tab.page.locator("#llava-stop").click()
        expect(tab.page.locator("#llava-status")).to_contain_text("that answer was not kept")
        expect(tab.page.locator("#llava-chat .bot.message")).to_have_count(0)
        assert ollama_daemon.client_gone.wait(timeout=15), "the engine was not stopped"


def test_engine_failure_is_shown_on_the_page(
    browser: Browser, ollama_page: Served, digit_png: Path
) -> None:
    """Pointing the page at an Ollama address where nothing listens shows the error
    text on the page, not a traceback, and the question stays in the text box."""
    from playwright.sync_api import expect

    nowhere = f"127.0.0.1:{free_port()}"
    with open_tab(browser, ollama_page) as tab:
        tab.page.locator("#llava-engine").get_by_text("Engine and model").click()
        fill_setting(tab, "llava-host", nowhere)
        tab.page.locator("#llava-use-engine").click()
        status = tab.page.locator("#llava-status")
        expect(status).to_contain_text(re.compile(rf"no Ollama daemon answers at \S*{nowhere}"))

        upload(tab, digit_png)
        ask(tab, "What digit is this?")
        wait_for_bot_text(tab, "ollama serve")
        screenshot(tab, "ui-engine-error.png")
        page_text = tab.page.locator("body").inner_text()
        assert "Traceback" not in page_text
        assert tab.page.locator("#llava-question textarea").input_value() == "What digit is this?"


# --- with the bundled demo model -------------------------------------------------------


def test_demo_model_reads_the_digit_on_the_page(
    browser: Browser, digit_png: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The bundled demo model, asked on the page about a handwritten digit it never
    saw in training, answers with the right digit on screen."""
    tmp = tmp_path_factory.mktemp("ui-demo")
    with (
        serve_page(tmp, "--backend", "llama_cpp", "--temperature", "0") as served,
        open_tab(browser, served) as tab,
    ):
        upload(tab, digit_png)
        ask(tab, "What digit is this?")
        wait_for_turn(tab, timeout_ms=ANSWER_TIMEOUT_MS)
        answer = bot_texts(tab)[-1]
        screenshot(tab, "ui-demo-digit.png")
        assert answer == f"This digit is {DIGIT_LABEL}.", served.output()
        from playwright.sync_api import expect

        expect(tab.page.locator("#llava-stats")).to_contain_text("pictures encoded")
        expect(tab.page.locator("#llava-status")).to_contain_text("llama_cpp")
