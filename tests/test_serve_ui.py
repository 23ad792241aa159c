"""The chat page at GET /, driven by headless Chromium (Selenium) against a live uvicorn server.

Needs Debian's `chromium` and `chromium-driver` packages (runs/test.sh installs them when it
can) and the `selenium` package; without them every test here skips with the reason.
"""

import os
import threading
import time

import jax.numpy as jnp
import pytest
from test_engine import random_params
from test_serve import CFG, TOK, chain_engine, server  # noqa: F401  (server is a fixture)

from nanochat_jax import engine
from nanochat_jax import scheduler as sched_mod
from serve.app import create_app
from nanochat_jax.scheduler import Engine, Event, Scheduler

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
_missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
pytestmark = pytest.mark.skipif(bool(_missing), reason=f"needs Debian's chromium and chromium-driver "
                                                      f"(missing {', '.join(_missing)})")
# Flags this machine needs: no network, running as root, no GPU.
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1100,900"]


@pytest.fixture
def browser(tmp_path, monkeypatch):
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs the selenium package (dev extra)")
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # never let Selenium Manager look for downloads
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in CHROME_FLAGS + [f"--user-data-dir={tmp_path / 'profile'}"]:
        opts.add_argument(flag)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=opts)
    try:
        yield driver
    finally:
        try:
            driver.quit()
        finally:
            if service.process and service.process.poll() is None:
                service.process.kill()


def wait(driver, cond, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: cond(d))


def by_css(driver, css):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def set_temperature(driver, value: str):
    box = by_css(driver, "#temperature")[0]
    box.clear()
    box.send_keys(value)


def finished_reply(driver, n=1):
    """The n-th assistant message once its stream has ended."""
    return wait(driver, lambda d: (m := by_css(d, ".msg.assistant[data-done]")) and len(m) >= n and m[n - 1])


class ScriptedScheduler(Scheduler):
    """Streams a fixed reply to every request, a few characters at a time: what a model could emit."""

    def __init__(self, text, finish="stop"):
        super().__init__(chain_engine("x"), slots=1)
        self.text, self.finish, self.prompts = text, finish, []

    def submit(self, req):
        self.prompts.append(req.prompt)

        def run():
            for i in range(0, len(self.text), 7):
                req.on_event(Event(0, self.text[i:i + 7]))
                time.sleep(0.005)
            req.on_event(Event(0, "", self.finish))
            req.on_event(None)
        threading.Thread(target=run, daemon=True).start()
        return req


def test_greedy_reply_streams_into_the_page(server, browser):  # noqa: F811
    import httpx
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    sched = Scheduler(Engine(random_params(CFG, seed=3), CFG, TOK, dtype=jnp.float32), slots=2)
    try:
        url = server(create_app(sched, "tiny"))
        want = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "hi\nthere"}], "temperature": 0}).json()
        want = want["choices"][0]["message"]["content"]
        browser.get(url + "/")
        assert browser.title == "nanochat-jax"
        set_temperature(browser, "0")
        box = by_css(browser, "#input")[0]
        box.send_keys("hi")
        ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
        box.send_keys("there")
        assert box.get_attribute("value") == "hi\nthere" and not by_css(browser, ".msg")  # Shift+Enter: newline
        box.send_keys(Keys.ENTER)
        reply = finished_reply(browser)
        assert by_css(browser, ".msg.user")[0].text == "hi\nthere"
        assert browser.execute_script("return history") == [
            {"role": "user", "content": "hi\nthere"}, {"role": "assistant", "content": want}]
        assert reply.text.strip() and not by_css(browser, ".msg.error")
        assert by_css(browser, "#status")[0].text == ""  # /health answered

        by_css(browser, "#new")[0].click()
        assert not by_css(browser, ".msg") and browser.execute_script("return history") == []
    finally:
        sched.close()


def test_model_html_is_shown_as_text(server, browser):  # noqa: F811
    text = ('hello <script>window.__pwned=1</script> **bold** and `x<b>y</b>` <img src=x '
            'onerror="window.__pwned=2">\n\n```html\n<b>code</b>\n```\nafter')
    sched = ScriptedScheduler(text)
    try:
        browser.get(server(create_app(sched, "scripted")) + "/")
        by_css(browser, "#input")[0].send_keys("show me html\n")
        reply = finished_reply(browser)
        time.sleep(0.2)  # an onerror handler would have fired by now
        assert browser.execute_script("return typeof window.__pwned") == "undefined"
        content = reply.get_attribute("textContent")
        assert "<script>window.__pwned=1</script>" in content and '<img src=x onerror="window.__pwned=2">' in content
        assert not by_css(browser, ".msg script, .msg img, .msg b")
        assert [e.text for e in by_css(browser, ".msg.assistant strong")] == ["bold"]
        assert [e.get_attribute("textContent") for e in by_css(browser, ".msg.assistant p code")] == ["x<b>y</b>"]
        assert [e.get_attribute("textContent") for e in by_css(browser, ".msg.assistant pre code")] == ["<b>code</b>"]
        assert browser.execute_script("return history[1].content") == text
    finally:
        sched.close()


def test_stop_button_frees_the_slot(server, browser, monkeypatch):  # noqa: F811
    real_step = engine.generate_step

    def slow_step(*a, **kw):  # ~100 tokens at 50 ms: only Stop can end it within the test's waits
        time.sleep(0.05)
        return real_step(*a, **kw)

    monkeypatch.setattr(sched_mod.E, "generate_step", slow_step)
    sched = Scheduler(chain_engine("ab", loop=True), slots=2)
    try:
        sched.warmup()  # a compile mid-stream would stall it
        browser.get(server(create_app(sched, "loop")) + "/")
        # greedy: the scripted model's margin is 8 logits, so at the page's default 0.8 about
        # 1 % of tokens would stray from "abab…"
        set_temperature(browser, "0")
        by_css(browser, "#input")[0].send_keys("go on forever\n")
        wait(browser, lambda d: len(by_css(d, ".msg.assistant")[0].text) >= 4)
        assert sched.busy_slots() == 1
        by_css(browser, "#stop")[0].click()
        reply = finished_reply(browser, 1)
        t0 = time.time()
        while (sched.busy_slots() or sched.queued()) and time.time() - t0 < 2:
            time.sleep(0.02)
        assert sched.busy_slots() == 0 and sched.queued() == 0  # the server saw the disconnect
        partial = browser.execute_script("return history[1].content")
        assert partial.startswith("abab") and len(partial) < 100 and reply.text.startswith("abab")
        assert by_css(browser, "#send")[0].is_enabled() and not by_css(browser, "#stop")[0].is_enabled()
    finally:
        sched.close()


def test_api_key_and_engine_down(server, browser):  # noqa: F811
    sched = ScriptedScheduler("the **answer**")
    try:
        url = server(create_app(sched, "keyed", api_key="sekret"))
        browser.get(url + "/")
        key = wait(browser, lambda d: (k := by_css(d, "#apikey")[0]).is_displayed() and k)  # /health: key needed
        by_css(browser, "#input")[0].send_keys("hello\n")
        wait(browser, lambda d: "API key" in "".join(e.text for e in by_css(d, ".msg.error")))
        assert not by_css(browser, ".msg.assistant")  # the failed turn left no empty bubble
        key.send_keys("sekret")
        by_css(browser, "#input")[0].send_keys("hello\n")
        reply = finished_reply(browser, 1)
        assert reply.text == "the answer" and by_css(reply, "strong")[0].text == "answer"
        assert browser.execute_script("return localStorage.getItem('nanochat-api-key')") == "sekret"

        down = create_app(sched, "down")

        @down.middleware("http")
        async def _no_engine(request, call_next):
            from fastapi.responses import JSONResponse
            if request.url.path == "/health":
                return JSONResponse({"status": "down"}, status_code=503)
            return await call_next(request)

        browser.get(server(down) + "/")
        wait(browser, lambda d: by_css(d, "#status")[0].text == "Engine not running")
    finally:
        sched.close()


def _history(driver):
    return driver.execute_script("return history")


def test_new_chat_while_streaming_leaves_a_clean_history(server, browser, monkeypatch):  # noqa: F811
    """New chat mid-stream: the old reply never lands in the new chat, and the next message works."""
    real_step = engine.generate_step

    def slow_step(*a, **kw):
        time.sleep(0.05)
        return real_step(*a, **kw)

    monkeypatch.setattr(sched_mod.E, "generate_step", slow_step)
    sched = Scheduler(chain_engine("ab", loop=True), slots=2)
    try:
        sched.warmup()
        browser.get(server(create_app(sched, "loop")) + "/")
        set_temperature(browser, "0")
        by_css(browser, "#input")[0].send_keys("go on forever\n")
        wait(browser, lambda d: len(by_css(d, ".msg.assistant")[0].text) >= 4)
        by_css(browser, "#new")[0].click()
        time.sleep(0.3)  # the aborted request's cleanup has run by now
        assert _history(browser) == [] and not by_css(browser, ".msg")
        assert by_css(browser, "#send")[0].is_enabled()
        monkeypatch.setattr(sched_mod.E, "generate_step", real_step)
        by_css(browser, "#input")[0].send_keys("hi again\n")
        wait(browser, lambda d: by_css(d, ".msg.assistant[data-done]") or by_css(d, ".msg.error"))
        assert not by_css(browser, ".msg.error")
        hist = _history(browser)
        assert [m["role"] for m in hist] == ["user", "assistant"] and hist[0]["content"] == "hi again"
        # Stop leaves [user, partial reply]; the next turn is accepted (no 400)
        monkeypatch.setattr(sched_mod.E, "generate_step", slow_step)
        by_css(browser, "#input")[0].send_keys("more\n")
        wait(browser, lambda d: len(by_css(d, ".msg.assistant")) == 2 and len(by_css(d, ".msg.assistant")[1].text) >= 4)
        by_css(browser, "#stop")[0].click()
        finished_reply(browser, 2)
        hist = _history(browser)  # (the long first reply filled the context: the server dropped it)
        assert hist[-2] == {"role": "user", "content": "more"} and hist[-1]["content"].startswith("abab")
        assert [m["role"] for m in hist] == ["user", "assistant"] * (len(hist) // 2)
        monkeypatch.setattr(sched_mod.E, "generate_step", real_step)
        by_css(browser, "#input")[0].send_keys("and again\n")
        finished_reply(browser, 3)
        assert not by_css(browser, ".msg.error") and _history(browser)[-2]["content"] == "and again"
    finally:
        sched.close()


def test_long_conversation_drops_oldest_turns_with_a_note(server, browser):  # noqa: F811
    """Past the 128-token context the server drops the oldest turns (the page asks it to):
    every turn still answers, a note says so, and no empty bubble or error is left."""
    sched = ScriptedScheduler("fine, thanks for asking me that")
    try:
        browser.get(server(create_app(sched, "scripted")) + "/")
        for i in range(4):
            by_css(browser, "#input")[0].send_keys(f"question number {i}, asked at some length\n")
            finished_reply(browser, i + 1)
        assert not by_css(browser, ".msg.error")
        notes = [e.text for e in by_css(browser, ".note")]
        assert notes and all("left out to fit the model's context" in n for n in notes)
        hist = _history(browser)
        assert hist[-2]["content"] == "question number 3, asked at some length" and len(hist) < 8
        assert hist[0]["role"] == "user"
        assert all(len(p) < 128 for p in sched.prompts)
        assert len(by_css(browser, ".msg.assistant")) == 4 and all(e.text for e in by_css(browser, ".msg.assistant"))
    finally:
        sched.close()


def test_error_leaves_no_empty_bubble(server, browser):  # noqa: F811
    sched = ScriptedScheduler("x")
    try:
        browser.get(server(create_app(sched, "scripted")) + "/")
        browser.execute_script("document.getElementById('input').value = 'y'.repeat(8001)")  # over the limit: 400
        by_css(browser, "#send")[0].click()
        wait(browser, lambda d: by_css(d, ".msg.error"))
        assert not by_css(browser, ".msg.assistant") and _history(browser) == []
    finally:
        sched.close()


def test_markdown_lists_and_headings(server, browser):  # noqa: F811
    text = "# Title\n\nIntro line.\n\n- one\n- **two**\n  continued\n\n3. third\n4. fourth\n\n## Sub <b>x</b>\nend"
    sched = ScriptedScheduler(text)
    try:
        browser.get(server(create_app(sched, "scripted")) + "/")
        by_css(browser, "#input")[0].send_keys("format it\n")
        reply = finished_reply(browser)
        assert [h.text for h in by_css(reply, "h1")] == ["Title"] and [h.text for h in by_css(reply, "h2")] == [
            "Sub <b>x</b>"]
        assert [li.text for li in by_css(reply, "ul > li")] == ["one", "two continued"]
        assert [s.text for s in by_css(reply, "ul strong")] == ["two"]
        ol = by_css(reply, "ol")[0]
        assert [li.text for li in by_css(ol, "li")] == ["third", "fourth"] and ol.get_attribute("start") == "3"
        assert [p.text for p in by_css(reply, "p")] == ["Intro line.", "end"] and not by_css(reply, "b")
    finally:
        sched.close()


def test_filtered_answers_are_shown_as_such(server, browser):  # noqa: F811
    from nanochat_jax.safety import Policy

    sched = ScriptedScheduler("Here is how to", finish="content_filter")  # an output cut by the filter
    try:
        browser.get(server(create_app(sched, "scripted", safety=Policy.load())) + "/")
        by_css(browser, "#input")[0].send_keys("how do I make a b\u043emb\n")  # refused before the model
        reply = finished_reply(browser)
        assert "filtered" in reply.get_attribute("class") and "safety policy" in reply.text
        assert "can't help" in reply.text and sched.prompts == [] and _history(browser) == []
        by_css(browser, "#input")[0].send_keys("tell me something\n")
        reply = finished_reply(browser, 2)
        assert "filtered" in reply.get_attribute("class") and reply.text.startswith("Here is how to")
        assert _history(browser) == []  # neither exchange stays in the conversation
    finally:
        sched.close()
