"""The chat page in a real browser: Debian's headless Chromium driven by Playwright (`make test`
installs the browser when it is missing). It sends a message and shows the reply as it streams."""

import shutil

import pytest

from tests.serve.conftest import API_KEY


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError("no Chromium on PATH: `make test` installs Debian's chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


def test_the_page_sends_a_message_and_streams_the_reply(server, browser, tmp_path):
    url, _ = server
    page = browser.new_page()
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(f"{url}/?key={API_KEY}")
    page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
    # count how often the reply bubble changes while it streams
    page.evaluate("""() => { window.updates = 0;
        new MutationObserver(() => window.updates++).observe(document.getElementById('log'),
                                                             {childList: true, subtree: true, characterData: true}); }""")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "24")
    page.fill("#system", "你是助手。")
    page.fill("#input", "你好")
    page.press("#input", "Enter")
    page.wait_for_selector(".msg.user")
    page.wait_for_function("!document.getElementById('send').disabled", timeout=60_000)
    reply = page.inner_text(".msg.assistant")
    assert reply.strip() and page.query_selector(".msg.error") is None
    assert page.evaluate("window.updates") > 3  # the user bubble, the empty reply, then piece after piece
    assert all(r.startswith(url) for r in requests)  # no external assets
    # the conversation is kept: the second turn sends both earlier messages
    page.fill("#input", "再说一遍")
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as sent:
        page.press("#input", "Enter")
    messages = sent.value.post_data_json["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[2]["content"] == reply
    page.wait_for_function("!document.getElementById('send').disabled", timeout=60_000)
    page.screenshot(path=str(tmp_path / "chat.png"))


def test_the_page_needs_the_key_when_one_is_set(server, browser):
    url, _ = server
    page = browser.new_page()
    response = page.goto(url + "/")
    assert response.status == 401 and "key" in page.inner_text("body")


def test_the_stop_button_ends_the_reply_and_frees_its_row(server, browser, monkeypatch):
    import time

    url, batcher = server
    step = batcher._step
    monkeypatch.setattr(batcher, "_step", lambda: (time.sleep(0.05), step()))  # 40 tokens: 2 s at least
    page = browser.new_page()
    page.goto(f"{url}/?key={API_KEY}")
    page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
    page.fill("#temperature", "1")
    page.fill("#max_tokens", "40")
    page.fill("#input", "你好")
    page.press("#input", "Enter")
    page.wait_for_function("document.querySelector('.msg.assistant') && "
                           "document.querySelector('.msg.assistant').textContent.length > 0", timeout=30_000)
    clicked = time.time()
    page.click("#stop")
    page.wait_for_function("!document.getElementById('send').disabled", timeout=5_000)
    while batcher.load()["running"] and time.time() < clicked + 10:
        time.sleep(0.01)
    assert batcher.load()["running"] == 0 and time.time() - clicked < 1.5
