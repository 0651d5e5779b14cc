"""What the rest of the suite needs from the machine: the shared data beside the checkout, the
shipped default model whole, Chromium and poppler. Other tests skip without these, so a machine
missing one would otherwise pass the suite with parts of it never run: here that is a failure.

Where a part is knowingly absent (a laptop without the datasets, no root to apt-install the
browser), set BT_NO_SHARED=1 or BT_NO_BROWSER=1 to skip these checks and run the rest.
"""
import os
import shutil

import pytest

from conftest import DATA, REPO


def _opted_out(var: str) -> None:
    if os.environ.get(var) == "1":
        pytest.skip(f"{var}=1: knowingly run without it")


def test_shared_data_is_beside_the_checkout():
    _opted_out("BT_NO_SHARED")
    missing = [p for p in (DATA / "brain-tumor-mri" / "Training", DATA / "samples", DATA / "br35h",
                           DATA / "brisc", DATA / "lgg-flair") if not p.is_dir()]
    assert not missing, (f"{', '.join(map(str, missing))} not found: the tests on real images would skip. "
                         "Put ../shared beside the checkout, or set BT_NO_SHARED=1 to run without it.")


def test_the_shipped_default_model_is_whole():
    default = REPO / "weights" / "DEFAULT"
    assert default.is_file(), "weights/DEFAULT is missing"
    d = REPO / "weights" / default.read_text().strip()
    missing = [f for f in ("card.json", "model.safetensors", "split.json", "eval.json", "history.json",
                           "ood.safetensors") if not (d / f).is_file()]
    assert not missing, f"{d} lacks {', '.join(missing)}"


def test_browser_and_pdf_tools_are_installed():
    _opted_out("BT_NO_BROWSER")
    from bench.app_memory import chromium_path
    missing = [name for name, ok in (("Chromium", chromium_path()), ("pdftotext", shutil.which("pdftotext")),
                                     ("pdftoppm", shutil.which("pdftoppm"))) if not ok]
    assert not missing, (f"{', '.join(missing)} not found: the browser and PDF tests would skip. Run setup.sh "
                         "as root (it apt-installs chromium and poppler-utils), or set BT_NO_BROWSER=1.")


@pytest.mark.parametrize("pytest_rc, setup_rc, ci_rc", [(0, 0, 0), (1, 0, 1), (5, 0, 1), (0, 1, 1)])
def test_ci_runs_the_readmes_test_command_and_fails_on_no_tests(tmp_path, pytest_rc, setup_rc, ci_rc):
    """.ci/run, with setup.sh and python3 stood in for: a pytest that collected nothing (exit 5)
    fails CI, as a failed setup does; otherwise pytest's own code is CI's. And what it runs is the
    README's test command."""
    import re
    import subprocess
    readme = (REPO / "README.md").read_text()
    command = re.search(r"^bash setup\.sh && (python3 -m pytest[^#\n]*?)\s*# set up and run the tests", readme, re.M)
    assert command, "the README's first screen gives no test command"
    (tmp_path / ".ci").mkdir()
    shutil.copy(REPO / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "setup.sh").write_text(f"echo setup >> calls.txt; exit {setup_rc}\n")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "python3").write_text(f'#!/bin/sh\necho "python3 $*" >> calls.txt\nexit {pytest_rc}\n')
    (bin_ / "python3").chmod(0o755)
    r = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], capture_output=True, text=True,
                       env={**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}"}, timeout=60)
    assert r.returncode == ci_rc, r.stdout + r.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert calls == (["setup"] if setup_rc else ["setup", command.group(1)])
