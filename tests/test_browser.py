"""End to end in a real browser: `streamlit run` on a free port, Chromium driven by Playwright.

Uploads a scan through the file chooser, waits for the prediction and the saliency map, saves
a screenshot of every page to tests/artifacts/, and records the cold start (server launch to
first prediction visible) and the server's peak RSS in tests/artifacts/browser_metrics.json.
Uses the shipped model when weights/DEFAULT names a trained one, else a random-init model.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.app_memory import chromium_path, free_port, wait_healthy  # one way to start a server
from conftest import DATA, REPO, make_weights

from playwright import sync_api  # in requirements.txt: a missing install is a failure, not a skip
ARTIFACTS = REPO / "tests" / "artifacts"
TIMEOUT_MS = 600_000  # generous: CI runners and this shared 2-core machine can be very busy


def weights_for_test(tmp: Path) -> Path:
    from core.app_support import is_model_dir
    from core.inference import WEIGHTS_ROOT
    default = WEIGHTS_ROOT / (WEIGHTS_ROOT / "DEFAULT").read_text().strip() \
        if (WEIGHTS_ROOT / "DEFAULT").is_file() else None
    if default is not None and is_model_dir(default):
        return default
    return make_weights(tmp / "random", arch="mobilenet_v3_small", size=176)


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM: the kernel's record of the process's peak resident set size."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    weights = weights_for_test(tmp_path_factory.mktemp("browser"))
    port = free_port()
    env = {**os.environ, "BT_WEIGHTS": str(weights), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.headless", "true",
           "--server.port", str(port), "--server.address", "127.0.0.1",
           "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"]
    log = open(tmp_path_factory.mktemp("log") / "streamlit.log", "w+")
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(proc, url, 120, poll_s=0.25)
        except RuntimeError as e:
            log.seek(0)
            pytest.fail(f"{e}:\n{log.read()[-3000:]}")
        yield {"url": url, "pid": proc.pid, "started": started, "weights": str(weights),
               "healthy_s": time.time() - started}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    exe = chromium_path()
    with sync_api.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        except Exception as e:  # no system chromium and no playwright-managed browser
            why = f"no usable Chromium ({exe or 'none found'}): {str(e).splitlines()[0]}"
            if os.environ.get("BT_NO_BROWSER") == "1":
                pytest.skip(why)
            pytest.fail(why + " (set BT_NO_BROWSER=1 to run without the browser tests)")
        yield b
        b.close()


def scan_to_upload() -> Path:
    folder = DATA / "brain-tumor-mri" / "Training" / "glioma"
    if folder.is_dir():
        return sorted(folder.glob("*.jpg"))[0]
    return REPO / "assets" / "samples" / "glioma.jpg"


def wait_for_app(page, marker: str) -> None:
    """The page shows ``marker``, its script run is over and every element is drawn.

    Checked twice a second apart: the 'running' widget can appear a moment after the page.
    """
    page.get_by_text(marker).first.wait_for()
    for _ in range(2):
        page.wait_for_function("!document.querySelector('[data-testid=\"stStatusWidget\"]')"
                               " && !document.querySelector('[data-testid=\"stSkeleton\"]')")
        page.wait_for_timeout(1000)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (independent of how busy the machine is)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def test_upload_predicts_and_every_page_looks_right(server, browser):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # Streamlit scrolls inside its main block, so a tall viewport is what a full screenshot takes.
    page = browser.new_page(viewport={"width": 1400, "height": 2200})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(f"{server['url']}/diagnose", timeout=TIMEOUT_MS)
    dropzone = page.locator("[data-testid='stFileUploaderDropzone'], "
                            "[data-testid='stFileUploadDropzone']").first
    dropzone.wait_for(timeout=TIMEOUT_MS)
    scan = scan_to_upload()
    with page.expect_file_chooser() as chooser:
        dropzone.click()
    chooser.value.set_files(str(scan))
    page.get_by_text("Prediction:").first.wait_for(timeout=TIMEOUT_MS)
    first_prediction, cold_cpu = time.time() - server["started"], cpu_seconds(server["pid"])
    rss_at_first_prediction = peak_rss_mb(server["pid"])
    saliency = page.locator("[data-testid='stImage'] img").nth(1)  # overlay after the scan
    saliency.wait_for(timeout=TIMEOUT_MS)
    with_saliency = time.time() - server["started"]
    assert page.get_by_text("over the model input").first.is_visible()
    # the scan, the overlay and the map alone; the last may arrive a moment after the caption
    page.locator("[data-testid='stImage'] img").nth(2).wait_for(timeout=TIMEOUT_MS)
    wait_for_app(page, "map alone")
    page.screenshot(path=str(ARTIFACTS / "2_diagnose.png"), full_page=True)

    # The other pages through the sidebar navigation, in the same session.
    nav = page.get_by_test_id("stSidebarNav")
    for link, marker, name in (("Home", "Pages", "1_home"),
                               ("Evaluation", "Tumours missed", "3_evaluation"),
                               ("Training", "Every model", "4_training"),
                               ("Model card", "How it was made", "5_model_card")):
        nav.get_by_text(link, exact=True).click()
        wait_for_app(page, marker)
        page.wait_for_timeout(1000)  # plotly draws after the run ends
        assert page.locator("[data-testid='stException']").count() == 0, name
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
        if name == "3_evaluation":  # the false-negative analysis sits in its own tab
            page.get_by_role("tab", name="False negatives").click()
            page.get_by_text("Tumours missed here").first.wait_for()
            wait_for_app(page, "Tumours missed here")
            page.screenshot(path=str(ARTIFACTS / "3b_evaluation_false_negatives.png"), full_page=True)
            page.get_by_role("tab", name="Calibration").click()
            page.wait_for_timeout(1500)
            page.screenshot(path=str(ARTIFACTS / "3c_evaluation_calibration.png"), full_page=True)

    metrics = {"weights": server["weights"], "scan": scan.name,
               "server_healthy_s": round(server["healthy_s"], 2),
               "cold_start_to_first_prediction_s": round(first_prediction, 2),
               "cold_start_to_saliency_s": round(with_saliency, 2),
               "server_cpu_s_to_first_prediction": cold_cpu,
               "load_average": os.getloadavg()[0],
               "server_peak_rss_mb_at_first_prediction": rss_at_first_prediction,
               "server_peak_rss_mb_after_all_pages": peak_rss_mb(server["pid"])}
    (ARTIFACTS / "browser_metrics.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics))


def test_batch_upload_shows_table_and_per_file_error(server, browser, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 3000})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(f"{server['url']}/diagnose")
    dropzone = page.locator("[data-testid='stFileUploaderDropzone'], "
                            "[data-testid='stFileUploadDropzone']").first
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    files = [REPO / "assets" / "samples" / "meningioma.jpg", broken]
    dicom = DATA / "samples" / "sample_pituitary.dcm"
    if dicom.is_file():
        files.append(dicom)
    with page.expect_file_chooser() as chooser:
        dropzone.click()
    chooser.value.set_files([str(f) for f in files])
    page.get_by_text(f"{len(files)} files, {len(files) - 1} read").wait_for()
    wait_for_app(page, "broken.jpg")
    assert page.locator("[data-testid='stAlertContentError']").filter(has_text="broken.jpg").count() == 1
    assert page.get_by_text("Prediction:").count() == len(files) - 1
    assert page.locator("[data-testid='stDataFrame']").count() >= 1
    page.screenshot(path=str(ARTIFACTS / "6_diagnose_batch.png"), full_page=True)


def test_a_report_goes_stale_when_the_saliency_method_changes(server, browser):
    """The method box lives in a fragment: changing it re-ran only the maps, and the PDF offered
    beside them still held the old method's maps. The Prepare button also stood beside the downloads."""
    page = browser.new_page(viewport={"width": 1400, "height": 2200})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(f"{server['url']}/diagnose")
    dropzone = page.locator("[data-testid='stFileUploaderDropzone'], "
                            "[data-testid='stFileUploadDropzone']").first
    with page.expect_file_chooser() as chooser:
        dropzone.click()
    chooser.value.set_files(str(REPO / "assets" / "samples" / "glioma.jpg"))
    wait_for_app(page, "map alone")
    prepare = page.get_by_role("button", name="Prepare a PDF and CSV report")
    prepare.click()
    wait_for_app(page, "Download the PDF report")
    assert prepare.count() == 0   # built: the downloads replace the button
    page.get_by_test_id("stSelectbox").filter(has_text="Saliency method").click()
    page.get_by_role("option", name="HiResCAM").click()
    wait_for_app(page, "Prepare a PDF and CSV report")
    assert page.get_by_text("Download the PDF report").count() == 0
    assert page.locator("[data-testid='stException']").count() == 0
