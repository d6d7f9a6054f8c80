"""The canvas page at `/`, in a real headless Chromium (Debian's chromium + chromium-driver, driven
by Selenium): type a prompt, send it, and read the DOM for the streamed answer (it must be the
server's own answer for the same seed), the drawn canvas (every position styled as in the
terminal view) and the honest stats; a second turn sends the answer back, never the thought."""
from __future__ import annotations

import os
import shutil

import pytest

from _cli_fixtures import make_model
from _serve_fixtures import FAST, HOST, ServerProcess

pytestmark = pytest.mark.slow
STATES = {"settled", "accepted", "renoised", "thinking"}


def _browser_paths():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    why = "needs Debian's chromium and chromium-driver (scripts/test.sh installs them)"
    if os.environ.get("CI"):
        pytest.fail(why)          # CI must run it, not skip it
    pytest.skip(why)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ServerProcess(make_model(tmp_path_factory.mktemp("page") / "tiny.gguf"), *FAST, "-a", "tiny")
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver_path = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    profile = tmp_path_factory.mktemp("chromium-profile")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,900", "--no-first-run", "--no-default-browser-check",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-extensions", "--disable-default-apps", f"--user-data-dir={profile}",
                # nothing but this machine: every host name but 127.0.0.1 fails to resolve
                f"--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE {HOST}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _wait(browser, script: str, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(browser, timeout, poll_frequency=0.05).until(lambda d: d.execute_script(script))


def _ask(browser, text: str):
    """Type a prompt, send it, wait for the reply; returns what the page drew."""
    from selenium.webdriver.common.by import By
    browser.execute_script("""
        window.__drawn = [];
        const draw = window.drawStep;
        window.drawStep = (s) => { window.__drawn.push([s.canvas, s.step]); draw(s); };""")
    box = browser.find_element(By.ID, "prompt")
    box.send_keys(text)
    browser.find_element(By.ID, "send").click()
    _wait(browser, "return document.getElementById('status').textContent.startsWith('done')")
    return browser.execute_script("""
        const msgs = [...document.querySelectorAll('.msg.assistant')];
        const last = msgs[msgs.length - 1];
        return {content: last.querySelector('.content').textContent,
                reasoning: last.querySelector('.reasoning').textContent,
                stats: document.getElementById('stats').textContent,
                status: document.getElementById('status').textContent,
                drawn: window.__drawn,
                tokens: [...document.querySelectorAll('#canvas .tok')].map(
                    (t) => ({cls: t.className, title: t.title, text: t.textContent}))};""")


def test_the_page_chats_and_draws_the_canvas_live(server, browser):
    from selenium.webdriver.common.by import By
    browser.get(server.url + "/")
    _wait(browser, "return document.getElementById('health').textContent === 'ready'")
    assert "tiny" in browser.find_element(By.ID, "model").text
    browser.find_element(By.ID, "seed").send_keys("7")
    browser.find_element(By.ID, "max").send_keys("32")

    got = _ask(browser, "Why is the sky blue?")
    client = server.client()
    q1 = [{"role": "user", "content": "Why is the sky blue?"}]
    want = client.chat.completions.create(model="tiny", messages=q1, max_tokens=32, seed=7)
    assert got["content"] == want.choices[0].message.content and got["content"]
    assert got["status"] == f"done · {want.choices[0].finish_reason}"
    # the canvas: the last draft, C positions, each in one of the view's states, with its entropy
    assert len(got["tokens"]) == 16
    for tok in got["tokens"]:
        assert set(tok["cls"].split()) & STATES and "entropy" in tok["title"]
    # drawn step by step while it denoised: every canvas's steps reached the page
    assert {c for c, _ in got["drawn"]} == set(range(want.diffusion["canvases"]))
    assert len(got["drawn"]) >= want.diffusion["canvases"]
    st = want.diffusion
    assert f"emitted {want.usage.completion_tokens} tok" in got["stats"]
    assert f"{st['steps'] / st['canvases']:.1f} steps/canvas" in got["stats"]
    assert f"seed 7" in got["stats"] and f"stop: {st['stop']}" in got["stats"]

    # second turn: the page sends the answer (never a thought) back; the prompt cache is reused
    got2 = _ask(browser, "And at sunset?")
    q2 = [*q1, {"role": "assistant", "content": got["content"]}, {"role": "user", "content": "And at sunset?"}]
    want2 = client.chat.completions.create(model="tiny", messages=q2, max_tokens=32, seed=7)
    assert got2["content"] == want2.choices[0].message.content
    assert f"({want2.usage.prompt_tokens} tok," in got2["stats"]
    cached = int(got2["stats"].split(" cached")[0].rsplit(", ", 1)[1])
    assert 0 < cached < want2.usage.prompt_tokens
    shot = os.environ.get("DIFFCLI_PAGE_SCREENSHOT")    # a picture of the page, for the notes
    if shot:
        browser.set_window_size(1200, 900)
        browser.save_screenshot(shot)


def test_the_page_shows_an_api_error(server, browser):
    from selenium.webdriver.common.by import By
    browser.get(server.url + "/")
    _wait(browser, "return document.getElementById('health').textContent === 'ready'")
    browser.find_element(By.ID, "max").send_keys("1000000")     # more than the context holds
    browser.find_element(By.ID, "prompt").send_keys("hi")
    browser.find_element(By.ID, "send").click()
    _wait(browser, "return document.getElementById('status').textContent === 'error'")
    text = browser.execute_script(
        "return [...document.querySelectorAll('.msg.assistant')].pop().textContent")
    assert "context" in text and "max_tokens" in text
