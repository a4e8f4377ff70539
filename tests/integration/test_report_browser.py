"""report.html in a real browser: headless Chromium lays out every plot at a visible size and paints the curves.

Needs a Chromium binary (Debian/Ubuntu: ``apt-get install -y chromium``); skipped with that hint when there is none.
Chromium runs with no network, no GPU and a throwaway profile, twice: ``--dump-dom`` on a copy of the report with a
probe script that writes each plot's laid-out size into the page, and ``--screenshot`` of the report itself.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from tests.unit.test_report import ALL_PLOTS, write_synthetic_run

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM = next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium not found (tried chromium, chromium-browser, google-chrome): apt-get install -y chromium"
)

# Chromium flags for a sandbox-less container with no network: nothing phones home, nothing waits for a GPU.
HEADLESS_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)
# Writes the laid-out size of every plot, and the number of drawn paths in it, into the DOM that --dump-dom prints.
LAYOUT_PROBE = """
<script>
const plots = [...document.querySelectorAll("figure.plot")].map(figure => {
  const box = figure.querySelector("svg").getBoundingClientRect();
  return {id: figure.id, width: box.width, height: box.height, paths: figure.querySelectorAll("svg path").length};
});
const probe = document.createElement("pre");
probe.id = "layout-probe";
probe.textContent = JSON.stringify(plots);
document.body.appendChild(probe);
</script>
"""
# matplotlib's first line colour, #1f77b4: the train loss curve.
CURVE_BLUE = (0x1F, 0x77, 0xB4)


def run_chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    command = [CHROMIUM, *HEADLESS_FLAGS, f"--user-data-dir={profile}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


@pytest.fixture(scope="module")
def report_path(tmp_path_factory) -> str:
    from paddle_llm.trainer.report import write_report

    return write_report(write_synthetic_run(tmp_path_factory.mktemp("browser") / "run"))


def test_every_plot_is_laid_out_at_a_visible_size(report_path, tmp_path):
    with open(report_path, encoding="utf-8") as f:
        page = f.read().replace("</body>", LAYOUT_PROBE + "</body>")
    probed = tmp_path / "probed.html"
    probed.write_text(page, encoding="utf-8")
    dom = run_chromium(tmp_path, "--window-size=1280,2000", "--dump-dom", probed.as_uri()).stdout
    match = re.search(r'<pre id="layout-probe">(.*?)</pre>', dom, re.DOTALL)
    assert match, f"the probe did not run; DOM starts: {dom[:500]}"
    plots = {plot["id"]: plot for plot in json.loads(match.group(1).replace("&quot;", '"'))}
    assert set(plots) == {f"plot-{name}" for name in ALL_PLOTS}
    for plot in plots.values():
        assert plot["width"] > 300 and plot["height"] > 150 and plot["paths"] > 5, plot


def test_the_screenshot_shows_the_curves(report_path, tmp_path):
    from PIL import Image

    screenshot = tmp_path / "report.png"
    run_chromium(tmp_path, "--window-size=1280,1600", f"--screenshot={screenshot}", "file://" + os.path.abspath(report_path))
    with Image.open(screenshot) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.int16).reshape(-1, 3)
    non_white = int(np.count_nonzero(pixels.min(axis=1) < 240))
    curve = int(np.count_nonzero(np.all(np.abs(pixels - CURVE_BLUE) < 30, axis=1)))
    assert non_white > 0.01 * len(pixels), "the page is blank"
    assert curve > 200, f"only {curve} pixels of the curve colour: the plots were not painted"
