"""The HTML report: one self-contained file per run or sweep, checked as text and in a real
headless browser (Debian's Chromium through ChromeDriver): it loads without console errors, its
table sorts, every image is present."""

from __future__ import annotations

import html
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from _records import run, stack
from PIL import Image

from fluxopt.record import write_record
from fluxopt.report.html import write_html

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run of three stacks with saved images (one stack's differ from the baseline's) and a
    profiled step, written as the runner writes them."""
    record = run([stack("fp8_max", 2.1, psnr=34.0), stack("fbcache", 1.6, psnr=31.0), stack("compile", 1.3)])
    record.prompts = ["a red circle", "an astronaut"]
    rng = np.random.default_rng(0)
    for s in [record.baseline, *record.stacks]:
        s.images = []
        for i in range(2):
            rel = f"images/{s.stack}/{i:02d}_seed{i}.png"
            pixels = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) if s.stack == "fbcache" else \
                np.full((64, 64, 3), 40 * (i + 1), dtype=np.uint8)
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(tmp_path / rel)
            s.images.append(rel)
    record.stacks[0].profile = {"wall_ms": 80.0, "busy_ms": 76.0, "gpu_idle_ms": 4.0, "device_to_host_copies": 7,
                                "breakdown_ms": {"gemm": 40.0, "attention": 20.0, "other": 16.0}}
    write_record(tmp_path / "result.json", record)
    return tmp_path


def test_the_page_is_self_contained_and_shows_every_stack(run_dir):
    page = write_html(run_dir).read_text()
    assert (run_dir / "report.html").is_file()
    assert not re.search(r"(src|href)=\"(?!data:|#)", page), "every image is inline, nothing is fetched"
    assert not re.search(r"<link\b|@import|url\((?!#|data:)", page), "no style sheet or font is fetched either"
    for name in ("baseline", "fp8_max", "fbcache", "compile"):
        assert f"<td>{name}</td>" in page
    assert page.count('class="heat"') == 6  # three stacks x two prompts
    assert "<svg" in page and 'id="profiles"' in page and "fp8_max" in page.split('id="profiles"')[1]
    assert "<td>80.0 ms, 7 copies to the host</td>" in page.split('id="profiles"')[1]


def test_the_run_hook_writes_the_page_with_its_images(run_dir):
    """The report ring's hook gets the runner's record (no path): the page is built from the
    written record, so the run's images are found."""
    from fluxopt.record import read_record
    from fluxopt.report import fluxopt_run_finished

    record = read_record(run_dir / "result.json")
    record.path = None
    fluxopt_run_finished(result=record, output_dir=str(run_dir))
    page = (run_dir / "report.html").read_text()
    assert page.count("data:image/png") == 8 + 6 and "missing" not in page


def test_a_sweep_page_names_the_results_it_could_not_use(run_dir, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(run_dir, sweep / "job0")
    (sweep / "job1").mkdir()
    (sweep / "job1" / "result.json").write_text("{")
    path = write_html(sweep)
    assert path.name == "summary.html"
    page = path.read_text()
    assert "job0: fp8_max" in page and "Not used" in page and "job1/result.json" in page
    verdict = page.split("<h2>Verdict</h2>")[1].split("<h2>")[0]  # verdict_of's: the unreadable job makes it incomplete
    assert verdict.startswith("<p>Failed (non-zero exit status), 1 reason(s):</p>") and "job1/result.json" in verdict


def test_a_run_page_states_its_records_verdict_with_every_reason(run_dir):
    assert "<h2>Verdict</h2><p>Passed (exit status 0).</p>" in write_html(run_dir).read_text()
    from fluxopt.record import read_record

    record = read_record(run_dir / "result.json")
    failing = run([stack("fp8_max", 2.1, psnr=12.0), stack("compile", 1.3)], complete=False)
    failing.baseline, failing.prompts = record.baseline, record.prompts
    write_record(run_dir / "result.json", failing)
    verdict = write_html(run_dir).read_text().split("<h2>Verdict</h2>")[1].split("<h2>")[0]
    assert verdict == ("<p>Failed (non-zero exit status), 2 reason(s):</p><ul>"
                       + "".join(f"<li>{html.escape(why)}</li>" for why in failing.failures()) + "</ul>\n")
    assert "fp8_max: fidelity: psnr" in verdict


def _browser():
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("FLUXOPT_REQUIRE_BROWSER"):
            pytest.fail("FLUXOPT_REQUIRE_BROWSER is set but chromium/chromedriver are not installed")
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1800"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _column(driver, index: int) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('#results tbody tr')).map(r => r.cells[arguments[0]].textContent)",
        index)


@pytest.mark.xdist_group("browser")
def test_the_page_in_a_headless_browser(run_dir, tmp_path):
    page = write_html(run_dir)
    driver = _browser()
    try:
        driver.get(page.as_uri())
        assert driver.title == f"fluxopt run: {run_dir.name}"
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        assert errors == []
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0])")
        assert len(images) == 8 + 6 and all(ok for _, ok in images), images
        assert _column(driver, 0) == ["baseline", "fp8_max", "fbcache", "compile"]
        speedup = driver.find_elements("css selector", "#results th")[2]
        speedup.click()
        assert _column(driver, 0) == ["compile", "fbcache", "fp8_max", "baseline"]  # ascending, empty last
        speedup.click()
        assert _column(driver, 0) == ["fp8_max", "fbcache", "compile", "baseline"]
        driver.find_elements("css selector", "#results th")[0].click()
        assert _column(driver, 0) == ["baseline", "compile", "fbcache", "fp8_max"]
        assert driver.save_screenshot(str(tmp_path / "report.png"))
        # the script really runs: an error in it would be a console error above, and would not sort
        driver.execute_script("console.error('probe')")
        assert any("probe" in e["message"] for e in driver.get_log("browser"))
    finally:
        driver.quit()
