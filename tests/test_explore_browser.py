"""Issue 15: ``cleandift explore`` end to end in a real headless browser (Debian's chromium + chromedriver).

The server runs in a thread on a free loopback port with the bundled mini model and its sample images.
The test clicks a known pixel on the source, with the source itself among the targets, and checks what
the *page* shows: the predicted point (DOM data attributes) lands within one feature cell of the click,
heatmaps are drawn, the JSON export holds the points, a click on a target makes it the source, and a
bad upload shows a message. Screenshots go to the test's ``tmp_path``.

Runs in CI (``.ci/run`` installs chromium); skipped only where chromium is missing *and* ``CI`` is unset.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SOURCE_PIXEL = (118.0, 150.0)  #: on the 256 px sample image (a boot: not background)


def _require(module: str):
    """Import an optional test dependency: skip locally without it, fail in CI."""
    if os.environ.get("CI"):
        return __import__(module)
    return pytest.importorskip(module)


@pytest.fixture(scope="module")
def server_url():
    _require("fastapi")
    _require("uvicorn")
    from cleandift.explore.server import bind, create_app, make_server, url_of
    from cleandift.explore.session import open_session

    explorer = open_session("mini")
    sock = bind("127.0.0.1", 0)
    server = make_server(create_app(explorer))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield url_of(sock)
    server.should_exit = True
    thread.join(10)
    sock.close()
    explorer.close()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        message = f"{CHROMIUM} / {CHROMEDRIVER} missing: apt-get install -y chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    _require("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    offline = os.environ.get("SE_OFFLINE")
    os.environ["SE_OFFLINE"] = "true"  # selenium-manager must never try the network
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1440,1150", "--force-device-scale-factor=1", "--hide-scrollbars"):
        options.add_argument(arg)
    downloads = str(tmp_path_factory.mktemp("downloads"))
    options.add_experimental_option("prefs", {"download.default_directory": downloads,
                                              "download.prompt_for_download": False})
    browser = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    browser.set_page_load_timeout(30)
    yield browser
    browser.quit()
    if offline is None:
        os.environ.pop("SE_OFFLINE", None)
    else:
        os.environ["SE_OFFLINE"] = offline


def _wait(driver, condition, timeout: float = 30.0, what: str = "condition"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d), message=what)


def _queries(driver) -> int:
    return int(driver.execute_script("return document.body.dataset.queries || 0"))


def _click_image(driver, view, xy: tuple[float, float], size: tuple[int, int]) -> None:
    """Click the displayed image at original pixel ``xy`` (offsets are from the element's centre)."""
    from selenium.webdriver.common.action_chains import ActionChains

    rect = driver.execute_script("const r = arguments[0].getBoundingClientRect(); "
                                 "return [r.width, r.height];", view)
    dx = (xy[0] + 0.5) / size[0] * rect[0] - rect[0] / 2
    dy = (xy[1] + 0.5) / size[1] * rect[1] - rect[1] / 2
    ActionChains(driver).move_to_element_with_offset(view, round(dx), round(dy)).click().perform()


def _markers(driver, css: str) -> list[dict]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map(m => ({...m.dataset}));", css)


@pytest.mark.slow
def test_click_match_heatmap_export_in_browser(server_url, driver, tmp_path):
    from selenium.webdriver.common.by import By

    driver.get(server_url)
    _wait(driver, lambda d: d.execute_script("return document.body.dataset.ready === '1'"), what="page ready")
    config = driver.execute_script("return state.config")
    size = (256, 256)
    # the source (image 0) also becomes a target, and all three methods are compared
    driver.find_element(By.CSS_SELECTOR, '.thumb[data-id="0"] .tick').click()
    frozen = driver.find_element(By.ID, "m-frozen")
    if not frozen.is_selected():
        frozen.click()
    _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".cell .view")) == 4 * 3,
          what="4x3 target grid")

    before = _queries(driver)
    _click_image(driver, driver.find_element(By.CSS_SELECTOR, "#source-view .view"), SOURCE_PIXEL, size)
    _wait(driver, lambda d: _queries(d) > before, what="match answer")
    clicked = _markers(driver, ".marker.src")
    assert len(clicked) == 1
    click_xy = (float(clicked[0]["x"]), float(clicked[0]["y"]))
    assert abs(click_xy[0] - SOURCE_PIXEL[0]) <= 1.5 and abs(click_xy[1] - SOURCE_PIXEL[1]) <= 1.5, click_xy

    cell = size[0] / (config["size"] // 2)  # us6 of the mini model: stride 2 -> 16 cells over 256 px
    preds = _markers(driver, '.marker.pred[data-target="0"]')
    assert {p["method"] for p in preds} == {"cleandift", "dift", "frozen"}
    for p in preds:  # the source matched against itself: the clicked point, within one feature cell
        assert abs(float(p["x"]) - click_xy[0]) <= cell and abs(float(p["y"]) - click_xy[1]) <= cell, p
    assert len(_markers(driver, ".marker.pred")) == 4 * 3
    rows = _markers(driver, "#results tr.result")
    assert len(rows) == 4 * 3 and all(-1 <= float(r["score"]) <= 1 for r in rows)
    heat = driver.execute_script(
        "return Array.from(document.querySelectorAll('canvas.heat')).filter(c => c.dataset.ready === '1' && "
        "getComputedStyle(c).display !== 'none' && c.width > 1).length")
    assert heat == 4 * 3
    driver.save_screenshot(str(tmp_path / "explore.png"))

    # template: a second keypoint, both transferred, exported as JSON
    driver.find_element(By.CSS_SELECTOR, '#mode input[value="template"] + span').click()
    before = _queries(driver)
    _click_image(driver, driver.find_element(By.CSS_SELECTOR, "#source-view .view"), (60.0, 200.0), size)
    _wait(driver, lambda d: len(_markers(d, '.marker.pred[data-point="1"]')) == 4 * 3, what="template answer")
    assert len(_markers(driver, ".marker.src")) == 2 and _queries(driver) > before
    driver.find_element(By.ID, "export").click()
    _wait(driver, lambda d: d.find_element(By.ID, "export-json").get_attribute("data-ready") == "1",
          what="export")
    doc = json.loads(driver.find_element(By.ID, "export-json").get_attribute("textContent"))
    assert doc["source"]["image"] == "ankle-boot-1.png" and len(doc["source"]["points"]) == 2
    assert doc["source"]["points"][0] == pytest.approx(list(click_xy), abs=0.01)
    same = next(t for t in doc["targets"] if t["id"] == 0)
    for method in ("cleandift", "dift", "frozen"):
        x, y = same["methods"][method]["points"][0]
        assert abs(x - click_xy[0]) <= cell and abs(y - click_xy[1]) <= cell
    driver.save_screenshot(str(tmp_path / "explore-template.png"))

    # a click on a target makes that image the source of the query
    driver.find_element(By.CSS_SELECTOR, '#mode input[value="click"] + span').click()
    target_view = driver.find_element(By.CSS_SELECTOR,
                                      '.cell[data-target="1"][data-method="cleandift"] .view')
    before = _queries(driver)
    _click_image(driver, target_view, (128.0, 128.0), size)
    _wait(driver, lambda d: _queries(d) > before and _markers(d, '.marker.pred[data-target="0"]'),
          what="answer after the swap")
    assert driver.find_element(By.CSS_SELECTOR, "#source-view .view").get_attribute("data-image") == "1"
    assert not _markers(driver, '.marker.pred[data-target="1"]')  # the new source is no longer a target
    assert len(_markers(driver, ".marker.src")) == 1

    # mutual nearest neighbours draw one canvas per target and method
    assert driver.execute_script("return state.targets") == [0, 2, 3]  # 1 -> 0 in place, no duplicate 0
    driver.find_element(By.CSS_SELECTOR, '#mode input[value="mutual"] + span').click()
    _wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, 'canvas.pair[data-ready="1"]')) == 3 * 3,
          what="mutual canvases")
    assert len(_markers(driver, "#results tbody tr")) > 0
    driver.save_screenshot(str(tmp_path / "explore-mutual.png"))

    # a bad upload is a message on the page, and the server keeps answering
    garbage = tmp_path / "not-an-image.png"
    garbage.write_bytes(b"this is not a png")
    driver.find_element(By.ID, "upload").send_keys(str(garbage))
    _wait(driver, lambda d: d.find_element(By.ID, "message").is_displayed(), what="upload error message")
    message = driver.find_element(By.ID, "message-text").get_attribute("textContent")
    assert "not-an-image.png: not a readable image format" in message, message
    driver.save_screenshot(str(tmp_path / "explore-bad-upload.png"))
    time.sleep(0.3)  # no query follows a refused upload: the message and the error state stay
    assert driver.find_element(By.ID, "message").is_displayed()
    assert driver.find_element(By.ID, "status").get_attribute("data-state") == "error"
    assert driver.execute_script("return fetch('/api/images').then(r => r.status)") == 200
