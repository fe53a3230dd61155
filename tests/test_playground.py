"""The playground page (issue 8): served with its assets, and driven end to end in headless Chromium.

The browser tests run against a real Hypercorn server on loopback (FakeEngine on the tiny model, as in
test_api_server.py) that requires an API key. They need Debian's `chromium` and `chromium-driver` and pip's
`selenium`; without them they skip, saying what to install. Screenshots go to $ARTIFACTS_DIR, else to a
pytest tmp folder (the path is printed).
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request

import pytest
from waits import HANG

from serving.app import create_app
from serving.playground import STATIC_DIR
from serving.settings import Settings

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1200,900",
)
API_KEY = "playground-test-key"
WAIT_S = HANG  # only a guard against a hang (tests/waits.py)


# ---- the page and its assets, in process ----


async def _get(app, path: str, headers: dict | None = None) -> tuple[int, str, str]:
    response = await app.test_client().get(path, headers=headers)
    return response.status_code, response.content_type, await response.get_data(as_text=True)


def test_page_and_assets_are_served_without_a_key():
    app = create_app(Settings(api_keys=(API_KEY,)), {})  # create_app registers the playground

    async def check():
        status, kind, html = await _get(app, "/")
        assert status == 200 and kind.startswith("text/html")
        assets = sorted(re.findall(r'(?:href|src)="(static/[^"]+)"', html))
        assert assets == ["static/playground.css", "static/playground.js"]
        for path, expected in zip(assets, ("text/css", "text/javascript"), strict=True):
            status, kind, _ = await _get(app, "/" + path)
            assert status == 200 and kind.startswith(expected), path
        # The API itself still needs the key; files outside static/ are not reachable.
        assert (await _get(app, "/v1/models"))[0] == 401
        assert (await _get(app, "/v1/models", {"Authorization": f"Bearer {API_KEY}"}))[0] == 200
        assert (await _get(app, "/static/missing.js"))[0] == 404
        assert (await _get(app, "/static/../playground.py"))[0] == 404

    asyncio.run(check())


def test_assets_load_nothing_from_elsewhere():
    """Works offline: no CDN, no web font, no absolute URL."""
    for path in STATIC_DIR.iterdir():
        assert not re.search(r"https?://|//cdn|@import|\burl\(", path.read_text()), path.name


def test_every_control_has_a_label():
    html = (STATIC_DIR / "playground.html").read_text()
    labelled = set(re.findall(r'<label for="([^"]+)"', html))
    labelled |= set(re.findall(r'<label[^>]*>[^<]*<input id="([^"]+)"', html))  # a control inside its label
    controls = set(re.findall(r'<(?:input|select|textarea) id="([^"]+)"', html))
    assert controls and controls <= labelled, controls - labelled


# ---- end to end in headless Chromium ----

needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="headless Chromium not installed: apt-get install -y chromium chromium-driver",
)


def _post(base_url: str, body: dict, timeout: float = WAIT_S) -> dict:
    """POST /v1/completions with the key, straight from Python."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"}
    request = urllib.request.Request(base_url + "/v1/completions", json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _api_error(base_url: str, body: dict) -> str:
    """The message of the error the API answers `body` with, asked directly."""
    with pytest.raises(urllib.error.HTTPError) as e:
        _post(base_url, body)
    return json.loads(e.value.read())["error"]["message"]


@pytest.fixture(scope="module")
def live_server(tiny_checkpoint):
    """The production serve() on a free loopback port, with API keys, FakeEngine on the tiny model."""
    from fake_engine import FakeEngine, ServerThread

    from serving.loading import registry_for

    settings = Settings(api_keys=(API_KEY,), max_n=4, max_tokens=120)
    registry = registry_for([pathlib.Path(tiny_checkpoint)], settings)
    srv = ServerThread(settings, registry, lambda model, _settings: FakeEngine(model)).start()
    try:
        srv.wait_for(lambda: srv.get("/health")[0] == 200, what="/health 200")
        # Compile what the page's requests use (logprobs, n) here, not while the browser waits.
        body = {"model": next(iter(registry.models)), "prompt": "Hi", "max_tokens": 2, "n": 2, "logprobs": 3}
        _post(srv.url, body)
        yield srv.url
    finally:
        assert srv.shutdown() == 0


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> pathlib.Path:
    out = pathlib.Path(os.environ.get("ARTIFACTS_DIR") or tmp_path_factory.mktemp("artifacts"))
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium not installed: pip install selenium"
    )
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT_S)
    yield driver
    driver.quit()


def _wait(driver, condition, message: str) -> None:
    """Polls until condition(driver); on a timeout fails with what the page shows, and its screenshot."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(condition)
    except TimeoutException:
        shot = (
            pathlib.Path(os.environ.get("ARTIFACTS_DIR") or tempfile.gettempdir()) / "playground-failure.png"
        )
        driver.save_screenshot(str(shot))
        pytest.fail(
            f"{message}; status line: {_status(driver)!r}; {_tokens(driver)} tokens shown; "
            f"Generate enabled: {_by_id(driver, 'generate').is_enabled()}; screenshot: {shot}"
        )


def _by_id(driver, element_id: str):
    return driver.find_element("id", element_id)


def _set(driver, element_id: str, value: str) -> None:
    element = _by_id(driver, element_id)
    element.clear()
    element.send_keys(value)


def _status(driver) -> str:
    return _by_id(driver, "status").text


def _is_error(driver) -> bool:
    return "error" in _by_id(driver, "status").get_attribute("class").split()


def _tokens(driver) -> int:
    return len(driver.find_elements("css selector", "#outputs .tok"))


def _ready(driver) -> bool:
    """Idle: Generate enabled, Stop disabled."""
    return _by_id(driver, "generate").is_enabled() and not _by_id(driver, "stop-button").is_enabled()


def _network(driver, **conditions) -> None:
    """Emulates network conditions through the DevTools protocol; no arguments: back to normal."""
    if not conditions:
        driver.execute_cdp_cmd("Network.disable", {})
        return
    driver.execute_cdp_cmd("Network.enable", {})
    defaults = {"offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1}
    driver.execute_cdp_cmd("Network.emulateNetworkConditions", defaults | conditions)


def _open_with_key(driver, url: str) -> None:
    """Opens the page in a fresh profile state, is asked for the key, enters it, sees the models."""
    driver.get(url + "/")
    driver.execute_script("localStorage.clear()")
    driver.refresh()
    _wait(driver, _is_error, "no API key was asked for")
    assert "API key" in _status(driver) and _by_id(driver, "key-box").get_attribute("open")
    _by_id(driver, "api-key").send_keys(API_KEY)
    _by_id(driver, "prompt").click()  # leaving the key field fetches the models with it
    _wait(driver, lambda d: _status(d).startswith("Ready"), "the models never loaded with the key")
    assert _by_id(driver, "model").get_attribute("value")
    assert "Authorization: Bearer $OPENAI_API_KEY" in _by_id(driver, "curl").text  # never the key itself
    _by_id(driver, "key-box").find_element("tag name", "summary").click()  # fold it away again


@needs_browser
def test_generate_streams_then_stop_cancels(browser, live_server, artifacts):
    from selenium.webdriver.common.action_chains import ActionChains

    _open_with_key(browser, live_server)

    # 1. A generation streams in, each token coloured by its probability, its logprob shown on hover.
    prompt = "The quick brown fox"
    _set(browser, "prompt", prompt)
    _set(browser, "max_tokens", "24")
    _set(browser, "n", "2")
    _set(browser, "temperature", "0.8")
    curl = _by_id(browser, "curl").text
    assert '"max_tokens": 24' in curl and f'"prompt": "{prompt}"' in curl and '"n": 2' in curl
    _by_id(browser, "generate").click()
    _wait(browser, lambda d: _status(d).startswith("Done"), "the first generation never finished")
    assert _ready(browser) and not _is_error(browser)
    completions = [e.text for e in browser.find_elements("css selector", "#outputs .completion")]
    assert len(completions) == 2
    assert all(c.startswith(prompt) for c in completions) and any(len(c) > len(prompt) for c in completions)
    token = browser.find_element("css selector", "#outputs .tok")
    assert re.search(r"p = [\d.]+%, logprob = -?[\d.]+", token.get_attribute("title"))
    assert token.value_of_css_property("background-color") not in ("", "rgba(0, 0, 0, 0)")
    ActionChains(browser).move_to_element(token).perform()
    _wait(browser, lambda d: "logprob" in _by_id(d, "token-info").text, "hovering a token shows nothing")
    browser.save_screenshot(str(artifacts / "playground.png"))

    # 2. A long generation read through a slow link, so it is surely still streaming: Stop cancels it.
    _set(browser, "n", "1")
    _set(browser, "max_tokens", "100")
    _network(browser, downloadThroughput=2000)  # bytes/s: a few chunks a second
    try:
        _by_id(browser, "generate").click()
        _wait(browser, lambda d: _tokens(d) > 0, "the second generation streamed nothing")
        assert _by_id(browser, "stop-button").is_enabled(), "the second generation was over already"
        _by_id(browser, "stop-button").click()
        _wait(browser, lambda d: _status(d) == "Stopped.", "Stop did not stop the generation")
        assert _ready(browser) and not _is_error(browser)
        stopped_at = _tokens(browser)
        assert 0 < stopped_at < 100
        time.sleep(0.5)
        assert _tokens(browser) == stopped_at, "tokens kept arriving after Stop"
        browser.save_screenshot(str(artifacts / "playground-stopped.png"))
    finally:
        _network(browser)
    print(f"playground screenshots in {artifacts}")


@needs_browser
def test_api_and_network_errors_are_shown_in_words(browser, live_server):
    _open_with_key(browser, live_server)
    _set(browser, "max_tokens", "100000")  # over the server's MAX_TOKENS: a 400 with a message
    body = {"model": _by_id(browser, "model").get_attribute("value"), "prompt": "x", "max_tokens": 100000}
    expected = _api_error(live_server, body)
    _by_id(browser, "generate").click()
    _wait(browser, _is_error, "the API error was not shown")
    assert expected in _status(browser) and "400" in _status(browser)
    assert _ready(browser)

    _set(browser, "max_tokens", "8")
    _network(browser, offline=True)
    try:
        _by_id(browser, "generate").click()
        _wait(browser, lambda d: _status(d).startswith("Network error"), "the network error was not shown")
        assert _is_error(browser) and _ready(browser)
    finally:
        _network(browser)
