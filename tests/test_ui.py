"""The web chat page, driven in headless Chromium against a real server (real engine, real uvicorn).

Debian's chromium (``make browser`` installs it; ``make test`` depends on that) is driven by
Playwright's Python package through ``executable_path`` — never ``playwright install``, which would
download a browser at test time.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from nanoseek.serve import ServeConfig, create_app
from nanoseek.serve.testing import CONTENT, REASONING, ServerThread, make_scripted_checkpoint

engine_mod = pytest.importorskip("nanoseek.engine")
sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "chat.png"
KEY = "sk-ui-test"

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing: run `make browser` (apt-get install -y chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    ckpt = make_scripted_checkpoint(tmp_path_factory.mktemp("ui") / "scripted")
    engine = engine_mod.Engine(str(ckpt), device="cpu")
    app = create_app(engine, ServeConfig(ckpt=str(ckpt), api_key=[KEY]))
    with ServerThread(app) as u:
        yield u, engine


@pytest.fixture(scope="module")
def page(url):
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        ctx = browser.new_context(viewport={"width": 1000, "height": 640})
        p = ctx.new_page()
        p.set_default_timeout(20_000)
        yield p
        browser.close()


def test_chat_page_streams_answer_and_thinking(url, page):
    base, engine = url
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(base + "/")
    page.click("#settings summary")
    page.fill("#apikey", KEY)
    page.dispatch_event("#apikey", "change")
    page.fill("#temperature", "0")
    page.dispatch_event("#temperature", "change")
    page.click("#settings summary")
    page.wait_for_function("document.querySelector('#model').options.length >= 3")

    page.fill("[data-testid=input]", "Is the answer yes?")
    page.click("[data-testid=send]")
    answer = page.locator("[data-testid=assistant]").last
    sync_api.expect(answer.locator("[data-testid=content]")).to_have_text(CONTENT)
    sync_api.expect(answer.locator(".think-body")).to_have_text(REASONING)
    sync_api.expect(answer.locator("[data-testid=meta]")).to_contain_text("12 completion (6 reasoning)")
    meta = answer.locator("[data-testid=meta]").inner_text()
    assert re.search(r"\$0\.0000\d+", meta), meta

    # a second turn with the reasoner template: history is sent without reasoning_content (else 400)
    page.check("#think")
    page.fill("[data-testid=input]", "And again?")
    page.press("[data-testid=input]", "Enter")
    sync_api.expect(page.locator("[data-testid=assistant]")).to_have_count(2)
    sync_api.expect(page.locator("[data-testid=assistant]").last.locator("[data-testid=content]")).to_have_text(CONTENT)
    sync_api.expect(page.locator("[data-testid=stop]")).to_be_hidden()

    # the thinking is collapsible; open it for the screenshot
    page.locator("[data-testid=thinking] summary").first.click()
    assert page.locator("[data-testid=thinking]").first.get_attribute("open") is not None
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 5_000

    # the conversation survives a reload (localStorage)
    page.reload()
    sync_api.expect(page.locator("[data-testid=user]")).to_have_count(2)
    sync_api.expect(page.locator("[data-testid=assistant]").first.locator("[data-testid=content]")).to_have_text(CONTENT)
    assert errors == []


def test_stop_button_aborts_the_stream(url, page):
    base, engine = url
    step = engine.step  # a tiny model outruns a click: slow its steps so the stream is still going
    engine.step = lambda: (time.sleep(0.02), step())[1]
    page.goto(base + "/")
    page.click("#new")
    page.click("#settings summary")
    page.fill("#temperature", "2")  # off the scripted chain: wanders instead of ending
    page.dispatch_event("#temperature", "change")
    page.fill("#maxtokens", "200")
    page.dispatch_event("#maxtokens", "change")
    page.click("#settings summary")
    page.uncheck("#think")
    # 200 slowed, sampled tokens take longer than a click: stop lands mid-stream
    page.fill("[data-testid=input]", "Ramble, please.")
    page.click("[data-testid=send]")
    page.click("[data-testid=stop]")
    sync_api.expect(page.locator("[data-testid=send]")).to_be_visible()
    meta = page.locator("[data-testid=assistant]").last.locator("[data-testid=meta]")
    sync_api.expect(meta).to_contain_text("stopped")
    deadline = time.monotonic() + 10
    while engine.num_running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.num_running == 0 and engine.num_waiting == 0 and engine.cache_usage == 0
    engine.step = step


def test_chat_page_shows_tool_calls(url, page):
    """A tools list in the settings and tool choice "required": the reply's call is shown, its
    arguments valid JSON for the function's schema."""
    import json

    base, _ = url
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
        "additionalProperties": False}}}]
    page.goto(base + "/")
    page.click("#new")
    page.click("#settings summary")
    page.fill("#apikey", KEY)
    page.dispatch_event("#apikey", "change")
    page.fill("#temperature", "1")
    page.dispatch_event("#temperature", "change")
    page.fill("#maxtokens", "60")
    page.dispatch_event("#maxtokens", "change")
    page.fill("#tools", json.dumps(tools))
    page.dispatch_event("#tools", "change")
    page.select_option("#toolchoice", "required")
    page.dispatch_event("#toolchoice", "change")
    page.click("#settings summary")
    page.uncheck("#think")
    page.fill("[data-testid=input]", "Weather?")
    page.click("[data-testid=send]")
    call = page.locator("[data-testid=assistant]").last.locator("[data-testid=toolcall]")
    sync_api.expect(call).to_have_count(1, timeout=30_000)
    text = call.inner_text()
    assert text.startswith("get_weather(") and json.loads(text[len("get_weather("):-1])["city"] in ("Paris", "Oslo")
