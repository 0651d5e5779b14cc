"""Cold start and memory of the Streamlit app, driven through a real browser as a person would.

    python bench/app_memory.py --json runs/app_memory.json
    python bench/app_memory.py --server-python /tmp/cpuvenv/bin/python   # another torch build
    python bench/app_memory.py --app cloud/streamlit_app.py               # Community Cloud's entry
    python bench/app_memory.py --env MALLOC_ARENA_MAX=8                     # an experiment

Starts ``streamlit run streamlit_app.py --server.headless true`` on a free port (file watcher
off, so edits to the working tree during a run change nothing), then drives it with Playwright
and the system Chromium (as tests/test_browser.py launches it, no browser download): open Home,
open Diagnose, pick a built-in sample and wait for its prediction and saliency map, upload a
batch of scans (--batch, default 8, from the benchmark's Training folders) and wait for the
table, then a zip of zeros that inflates to --zip-mb (default 100 MB: past what a batch's zips
may add for their weight, `core.archive.unpack_allowance`); then a second visitor, in a new tab
(a second session beside the first), uploads one NIfTI volume (--volume, default 256 x 256 x 176
slices, built from one benchmark scan) and waits for its slice profile (a model with tumour
classes: the profile's marker; --volume none otherwise); then the first opens Evaluation, Training and Model card. Meanwhile the RSS of the server's process
tree is sampled every --interval seconds (psutil when installed, else /proc).

Prints the exact command and the machine (the server's Python, torch build and Streamlit), then:
- cold start: server process started -> first prediction text visible in the browser, and the
  server's CPU seconds until then (on a busy machine the wall time mostly measures waiting);
- peak RSS: the largest sample, and the kernel's own peak (VmHWM) of the server process;
- steady RSS: the median over --idle seconds of doing nothing after the last page;
- per step, the RSS when it ended and the peak during it;
and writes all of it (with every sample) as JSON to --json. Exit status 1 when a step failed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench._machine import cpu_model, usable_cores  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "brain-tumor-mri" / "Training"
CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
TIMEOUT_MS = 600_000  # this shared 2-core machine can be very busy


# ----------------------------------------------------------------------------- memory
def _proc_children(pid: int) -> list[int]:
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def _proc_status(pid: int, key: str) -> int | None:
    """A kB field (VmRSS, VmHWM) or a count (Threads) of /proc/PID/status."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far: what a cold start costs on an idle core,
    whatever else this machine is doing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)
    except (OSError, IndexError, ValueError):
        return None


def _rss_kb(pid: int) -> int | None:
    try:
        import psutil
        try:
            return psutil.Process(pid).memory_info().rss // 1024
        except psutil.Error:
            return None
    except ImportError:
        return _proc_status(pid, "VmRSS")


def _children(pid: int) -> list[int]:
    try:
        import psutil
        try:
            return [c.pid for c in psutil.Process(pid).children()]
        except psutil.Error:
            return []
    except ImportError:
        return _proc_children(pid)


def tree_rss_mb(pid: int) -> float | None:
    """Resident memory of a process and all its descendants, in MB (2**20 bytes).

    A child that still shares its parent's address space (vfork, between fork and exec) shows
    the parent's RSS as its own; it is counted once, as the kernel and a cgroup limit do.
    """
    root = _rss_kb(pid)
    if root is None:
        return None
    total, todo, seen = root, [(c, root) for c in _children(pid)], {pid}
    while todo:
        p, parent_kb = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        kb = _rss_kb(p)
        if kb is None:
            continue
        if kb != parent_kb:  # equal: the same pages as the parent's, not memory of its own
            total += kb
        todo += [(c, kb) for c in _children(p)]
    return total / 1024


class Sampler(threading.Thread):
    """RSS of the server's process tree every ``interval`` seconds, with step marks."""

    def __init__(self, pid: int, t0: float, interval: float):
        super().__init__(daemon=True)
        self.pid, self.t0, self.interval = pid, t0, interval
        self.samples: list[tuple[float, float]] = []
        self.marks: list[tuple[str, float]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            mb = tree_rss_mb(self.pid)
            if mb is not None:
                self.samples.append((round(time.time() - self.t0, 2), round(mb, 1)))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    def mark(self, step: str) -> None:
        self.marks.append((step, round(time.time() - self.t0, 2)))

    def between(self, a: float, b: float) -> list[float]:
        return [mb for t, mb in self.samples if a <= t <= b]


# ----------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float, poll_s: float = 0.1) -> None:
    """Return once the Streamlit server at ``url`` answers its health check; RuntimeError when
    it exits first or stays silent for ``timeout_s``."""
    t0 = time.time()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}")
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                return
        except OSError:
            pass
        if time.time() - t0 > timeout_s:
            raise RuntimeError(f"streamlit did not answer /_stcore/health within {timeout_s:.0f} s")
        time.sleep(poll_s)


def chromium_path() -> str | None:
    for c in (os.environ.get("BT_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
              shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if c and Path(c).is_file():
            return c
    return None


def server_description(python: str) -> dict:
    """Python, torch (and its build) and Streamlit of the interpreter that ran the server."""
    code = ("import json, platform, torch, streamlit; print(json.dumps({'python': "
            "platform.python_version(), 'torch': torch.__version__, 'torch_cuda': torch.version.cuda, "
            "'torch_default_threads': torch.get_num_threads(), 'streamlit': streamlit.__version__}))")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as e:  # a description must never lose the measurement
        return {"error": f"{type(e).__name__}: {e}"}


def mem_total_mb() -> float | None:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def zeros_zip(path: Path, megabytes: int, member_mb: int = 20) -> Path:
    """A zip of members of zeros that inflates to ``megabytes`` (a few hundred kB on disk): the
    worst case of what a batch's zips add to the server's memory."""
    import zipfile
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for k in range(-(-megabytes // member_mb)):
            z.writestr(f"m{k}.jpg", bytes(min(member_mb, megabytes - k * member_mb) * 2**20))
    return path


def head_volume(path: Path, shape: tuple[int, int, int]) -> Path:
    """A NIfTI volume of ``shape`` (x, y, slices; int16, gzipped) built from one benchmark scan,
    lit along the slices as a head is (the end slices empty): what a whole-volume upload costs,
    as the Diagnose page reads, scores and profiles every slice. No real volume of that size is in
    ../shared; the memory does not depend on what the slices show."""
    import nibabel as nib
    import numpy as np
    from PIL import Image
    src = sorted((DATA / "glioma").glob("*.jpg"))[0]
    plane = np.asarray(Image.open(src).convert("L").resize(shape[:2]), dtype=np.float32)
    envelope = np.sin(np.linspace(0.0, np.pi, shape[2])) ** 0.5   # dark ends, lit middle
    vol = (plane.T[:, :, None] * envelope[None, None, :] * 8).astype(np.int16)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(path))
    return path


def batch_files(n: int) -> list[Path]:
    """``n`` benchmark training images, round-robin over the classes (the same every run)."""
    per = {c: sorted((DATA / c).glob("*.jpg")) for c in CLASSES}
    files = []
    for k in range(n):
        c = CLASSES[k % len(CLASSES)]
        if k // len(CLASSES) < len(per[c]):
            files.append(per[c][k // len(CLASSES)])
    return files


# ----------------------------------------------------------------------------- browser
def upload(page, paths: list[Path]) -> None:
    """Add ``paths`` to the Diagnose page's uploader, as a person choosing files would."""
    dropzone = page.locator("[data-testid='stFileUploaderDropzone'], "
                            "[data-testid='stFileUploadDropzone']").first
    with page.expect_file_chooser() as chooser:
        dropzone.click()
    chooser.value.set_files([str(f) for f in paths])


def wait_for_app(page, marker) -> None:
    """``marker`` is shown, the script run is over and nothing is still being drawn."""
    loc = page.get_by_text(marker).first
    loc.wait_for(timeout=TIMEOUT_MS)
    for _ in range(2):
        page.wait_for_function("!document.querySelector('[data-testid=\"stStatusWidget\"]')"
                               " && !document.querySelector('[data-testid=\"stSkeleton\"]')",
                               timeout=TIMEOUT_MS)
        page.wait_for_timeout(1000)


def drive(url: str, sampler: Sampler, t0: float, sample: str, files: list[Path],
          timings: dict, pid: int, zip_file: Path | None = None, zip_mb: int = 0,
          volume: Path | None = None) -> None:
    from playwright.sync_api import sync_playwright
    exe = chromium_path()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 2200})
        page.set_default_timeout(TIMEOUT_MS)

        page.goto(url, timeout=TIMEOUT_MS)
        wait_for_app(page, "Pages")
        timings["home_s"] = round(time.time() - t0, 2)
        sampler.mark("home")

        page.get_by_test_id("stSidebarNav").get_by_text("Diagnose", exact=True).click()
        wait_for_app(page, "Upload scans")
        sampler.mark("diagnose")

        page.get_by_test_id("stMultiSelect").first.click()
        page.get_by_role("option", name=sample).first.click()
        page.keyboard.press("Escape")
        page.get_by_text("Prediction:").first.wait_for(timeout=TIMEOUT_MS)
        timings["cold_start_to_first_prediction_s"] = round(time.time() - t0, 2)
        timings["server_cpu_s_to_first_prediction"] = cpu_seconds(pid)
        page.get_by_text("map alone").first.wait_for(timeout=TIMEOUT_MS)
        timings["cold_start_to_saliency_s"] = round(time.time() - t0, 2)
        wait_for_app(page, "map alone")
        sampler.mark("sample prediction + saliency")

        if files:
            upload(page, files)
            page.get_by_text(re.compile(r"^\d+ files, \d+ read$")).first.wait_for(timeout=TIMEOUT_MS)
            wait_for_app(page, "map alone")
            sampler.mark(f"batch of {len(files)} uploads")

        if zip_file:   # what a small zip that inflates far costs the server (core.archive's cap)
            upload(page, [zip_file])
            wait_for_app(page, re.compile(r"^\d+ files, \d+ read$"))
            sampler.mark(f"zip of {zip_file.stat().st_size // 1024} kB inflating to {zip_mb} MB")

        if volume:   # a second visitor, the first one's session still held: one volume alone, each
            # slice read and scored, its profile drawn (a tumour-class model: its marker; else --volume none)
            second = browser.new_page(viewport={"width": 1400, "height": 2200})
            second.set_default_timeout(TIMEOUT_MS)
            second.goto(url, timeout=TIMEOUT_MS)
            wait_for_app(second, "Pages")
            second.get_by_test_id("stSidebarNav").get_by_text("Diagnose", exact=True).click()
            wait_for_app(second, "Upload scans")
            upload(second, [volume])
            wait_for_app(second, "Tumour probability across the slices")
            sampler.mark(f"second session: volume of {volume.stat().st_size // 1024} kB")
            second.close()

        nav = page.get_by_test_id("stSidebarNav")
        for link, marker in (("Evaluation", "Tumours missed"), ("Training", "Every model"),
                             ("Model card", "How it was made")):
            nav.get_by_text(link, exact=True).click()
            wait_for_app(page, marker)
            page.wait_for_timeout(1000)  # plotly draws after the run ends
            if page.locator("[data-testid='stException']").count():
                raise RuntimeError(f"the {link} page shows an exception")
            sampler.mark(link.lower())
        browser.close()


# ----------------------------------------------------------------------------- main
def volume_shape(text: str) -> tuple[int, int, int] | None:
    """'256x256x176' -> (256, 256, 176); 'none' -> None."""
    if text == "none":
        return None
    try:
        shape = tuple(int(v) for v in text.split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 256x256x176, nor none")
    return shape


def _terminated(signum, frame):
    raise SystemExit(f"stopped by signal {signum}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="write the result here")
    p.add_argument("--server-python", default=sys.executable,
                   help="interpreter that runs streamlit (e.g. a venv with another torch build)")
    p.add_argument("--app", default="streamlit_app.py",
                   help="entry point, relative to the repository (cloud/streamlit_app.py: Cloud's)")
    p.add_argument("--weights", help="BT_WEIGHTS for the server (default: weights/DEFAULT)")
    p.add_argument("--sample", default="glioma.jpg", help="built-in sample to predict first")
    p.add_argument("--batch", type=int, default=8, help="scans to upload at once (0: none)")
    p.add_argument("--zip-mb", type=int, default=100,
                   help="then upload a zip inflating to this many MB of zeros (0: none)")
    p.add_argument("--volume", default="256x256x176", type=volume_shape,
                   help="then, in a second session, upload a NIfTI volume of this shape (x, y, slices) "
                        "(none: no volume)")
    p.add_argument("--interval", type=float, default=0.1, help="seconds between RSS samples")
    p.add_argument("--idle", type=float, default=5.0, help="seconds idle at the end (steady RSS)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the server (repeatable)")
    a = p.parse_args(argv)

    cmd_line = "python " + shlex.join(sys.argv)
    try:  # the model the session starts with (weights/DEFAULT is read when the run starts)
        model = Path(a.weights).name if a.weights else \
            (ROOT / "weights" / "DEFAULT").read_text().strip()
    except OSError:
        model = None
    files = batch_files(a.batch) if a.batch else []
    if a.batch and not files:
        print(f"note: no images under {DATA}; the batch step is skipped")
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("BT_WEIGHTS", None)
    if a.weights:
        env["BT_WEIGHTS"] = str(Path(a.weights).resolve())
    extra = dict(kv.split("=", 1) for kv in a.env)
    env.update(extra)
    server_cmd = [a.server_python, "-m", "streamlit", "run", a.app,
                  "--server.headless", "true", "--server.port", str(port),
                  "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
                  # Edits to the working tree during a run must not rerun the app's code.
                  "--server.fileWatcherType", "none"]
    load_before = os.getloadavg()[0]
    print(f"command: {cmd_line}")
    print(f"model: {model}")
    print(f"server: {' '.join(f'{k}={v}' for k, v in extra.items())} {shlex.join(server_cmd)}".strip())

    signal.signal(signal.SIGTERM, _terminated)
    log = open(ROOT / "runs" / f"app_memory_server_{port}.log", "w") if (ROOT / "runs").is_dir() \
        else subprocess.DEVNULL  # the server's output, for when a step fails
    t0 = time.time()
    proc = subprocess.Popen(server_cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    sampler = Sampler(proc.pid, t0, a.interval)
    sampler.start()
    timings: dict = {}
    error = None
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, url, 300 - (time.time() - t0))
        timings["server_healthy_s"] = round(time.time() - t0, 2)
        sampler.mark("server healthy")
        zip_file = zeros_zip(Path(tempfile.mkdtemp()) / "zeros.zip", a.zip_mb) if a.zip_mb else None
        volume = head_volume(Path(tempfile.mkdtemp()) / "head.nii.gz", a.volume) if a.volume else None
        drive(url, sampler, t0, a.sample, files, timings, proc.pid, zip_file, a.zip_mb, volume)
        time.sleep(a.idle)
        sampler.mark("idle")
    except (Exception, KeyboardInterrupt, SystemExit) as e:  # SIGTERM too: report what we have
        error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    finally:
        hwm_kb = _proc_status(proc.pid, "VmHWM")
        timings["server_cpu_s_total"] = cpu_seconds(proc.pid)
        threads = _proc_status(proc.pid, "Threads")
        sampler.stop()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log is not subprocess.DEVNULL:
            log.close()

    s = sampler
    steps, prev = [], 0.0
    for name, t in s.marks:
        during = s.between(prev, t)
        steps.append({"step": name, "at_s": t, "rss_mb_end": during[-1] if during else None,
                      "peak_mb": max(during) if during else None})
        prev = t
    end = s.marks[-1][1] if s.marks else (s.samples[-1][0] if s.samples else 0.0)
    idle = s.between(end - a.idle, end) if s.marks and s.marks[-1][0] == "idle" else []
    machine = {"cpu": cpu_model(), "cores": usable_cores(),
               "memory_mb": round(mem_total_mb() or 0), "load_avg_1m_before": round(load_before, 2),
               "load_avg_1m_after": round(os.getloadavg()[0], 2),
               **server_description(a.server_python)}
    result = {
        "command": cmd_line, "server_command": server_cmd, "server_env": extra, "machine": machine,
        "app": a.app, "weights": a.weights or "weights/DEFAULT", "model": model, "sample": a.sample,
        "batch": [f.name for f in files], **timings,
        "peak_rss_mb": max((mb for _, mb in s.samples), default=None),
        "server_vmhwm_mb": round(hwm_kb / 1024, 1) if hwm_kb else None,
        "steady_rss_mb": round(statistics.median(idle), 1) if idle else None,
        "server_threads_at_end": threads, "steps": steps, "error": error,
        "interval_s": a.interval, "samples": s.samples}
    print("machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()))
    for st in steps:
        print(f"  {st['step']:<28} at {st['at_s']:7.1f} s  RSS {st['rss_mb_end']} MB"
              f" (peak {st['peak_mb']} MB)")
    print(f"cold start to first prediction: {timings.get('cold_start_to_first_prediction_s')} s"
          f" (server healthy {timings.get('server_healthy_s')} s, saliency "
          f"{timings.get('cold_start_to_saliency_s')} s); server CPU time to it "
          f"{timings.get('server_cpu_s_to_first_prediction')} s (on a busy machine the wall time "
          "mostly measures waiting)")
    print(f"peak RSS: {result['peak_rss_mb']} MB sampled every {a.interval} s"
          f" (kernel VmHWM of the server: {result['server_vmhwm_mb']} MB)")
    print(f"steady RSS (median of {a.idle:g} s idle at the end): {result['steady_rss_mb']} MB")
    if error:
        print(f"ERROR: {error}")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1))
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
