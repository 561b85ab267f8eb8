"""The /dashboard page in a real browser: headless Chromium (Selenium) against a live training endpoint.

Set-up: Debian packages `chromium` and `chromium-driver` (/usr/bin/chromium, /usr/bin/chromedriver).
"""

import json
import shutil
import subprocess
import sys
import time

import pytest

from monitor_support import TrainingInThread

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(
    not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)),
    reason="the browser test needs Chromium and its driver: apt-get install chromium chromium-driver",
)

# Counts the canvas pixels drawn in the chart's line colour (#1f6fd1): > 0 means a line is on screen.
DRAWN_PIXELS = """
const canvas = document.querySelector(arguments[0] + ' canvas');
const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
let n = 0;
for (let i = 0; i < data.length; i += 4) if (data[i] === 0x1f && data[i + 1] === 0x6f && data[i + 2] === 0xd1) n++;
return n;
"""


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def points(browser, chart: str) -> int:
    return int(browser.find_element("css selector", f"#chart-{chart}").get_attribute("data-points"))


def test_dashboard_charts_show_a_live_training_run(browser):
    with TrainingInThread(sleep_s=0.002, steps=2000) as training:
        browser.get(training.url + "/dashboard")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and min(points(browser, "train_loss"), points(browser, "step_mean")) < 3:
            time.sleep(0.5)
        assert points(browser, "train_loss") >= 3 and points(browser, "step_mean") >= 3
        assert browser.execute_script(DRAWN_PIXELS, "#chart-train_loss") > 50
        shown = browser.find_element("css selector", "#chart-train_loss .value").text
        assert float(shown) > 0  # the current loss, as a number
        assert browser.find_element("id", "status").text.startswith("live")
        # serving charts stay empty against a training endpoint
        assert points(browser, "latency_p95") == 0
    # the endpoint is gone: the page says so instead of freezing
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "cannot reach" not in browser.find_element("id", "status").text:
        time.sleep(0.5)
    assert "cannot reach /metrics" in browser.find_element("id", "status").text


@pytest.mark.slow
def test_dashboard_charts_show_a_live_ds_serve_under_load(browser, digits_mlp, tmp_path):
    process = pytest.importorskip("fullchain.deploy.process", reason="ds serve (fullchain.deploy) is not installed")
    payloads = pytest.importorskip("fullchain.deploy.payloads")
    bodies = tmp_path / "payloads.json"
    bodies.write_text(json.dumps(payloads.sample_requests(digits_mlp, 32)))
    with process.ServerProcess(["serve", str(digits_mlp)]) as server:
        load = subprocess.Popen([sys.executable, "-m", "fullchain.deploy.loadgen", server.url + "/v1/predict",
                                 str(bodies), "--concurrency", "8", "--seconds", "8"], stdout=subprocess.DEVNULL)
        browser.get(server.url + "/dashboard")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and min(points(browser, "latency_p95"),
                                                  points(browser, "throughput_rps")) < 3:
            time.sleep(0.5)
        assert points(browser, "latency_p95") >= 3 and points(browser, "batch_mean") >= 3
        assert browser.execute_script(DRAWN_PIXELS, "#chart-latency_p95") > 50
        assert float(browser.find_element("css selector", "#chart-throughput_rps .value").text) > 0
        load.terminate()  # seen under load: the rest of its 8 s proves nothing more
        load.wait(60)
