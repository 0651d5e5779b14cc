"""Memory guards of the app server: process settings (core.runtime), byte-bounded session caches,
frozen model weights. The end-to-end numbers come from bench/app_memory.py."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO


def _run(code: str, **env) -> str:
    import os
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_runtime_blocks_triton_and_caps_arenas():
    code = ("import os, sys; from core import runtime; print(sys.modules['triton'] is None, "
            "runtime._LIBC is None or runtime.ARENAS_SET == (not runtime._arenas_given()))")
    assert _run(code, BT_ALLOW_TRITON="") == "True True"


# 64 MB of heap blocks (64 kB: below glibc's mmap threshold) freed below a block that stays
# allocated, so free() cannot give them back by itself: only malloc_trim returns those pages.
TRIM_CODE = """
import ctypes
from core import runtime
if runtime._LIBC is None:
    print("no glibc")
else:
    libc = runtime._LIBC
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(64 * 1024) for _ in range(1024)]
    pin = libc.malloc(64)
    assert all(blocks) and pin
    for b in blocks:
        ctypes.memset(b, 1, 64 * 1024)  # touched: resident pages to hand back
    for b in blocks:
        libc.free(b)
    print(runtime.trim())
    libc.free(pin)
"""


def test_runtime_trim_hands_freed_heap_back_to_the_kernel():
    out = _run(TRIM_CODE)
    if out == "no glibc":  # as core.runtime decides: no malloc_trim there, trim() is always False
        pytest.skip("the C library is not glibc")
    assert out == "True"


def test_runtime_lets_triton_load_when_asked():
    code = "import sys; from core import runtime; print(sys.modules.get('triton', 'absent') is None)"
    assert _run(code, BT_ALLOW_TRITON="1") == "False"


def test_lru_bounded_by_bytes_keeps_newest():
    from core.app_support import LRU
    from core.reader import ScanImage
    lru = LRU(size=10, max_bytes=3 * 400)
    for k in range(5):
        lru.get_or(k, lambda: np.zeros(100, np.float32))  # 400 bytes each
    assert list(lru) == [2, 3, 4] and lru.bytes == 1200
    lru.get_or("big", lambda: ScanImage(np.zeros((100, 100), np.float32)))  # 40 kB: alone
    assert list(lru) == ["big"] and lru.bytes == 40_000
    lru.get_or("small", lambda: {"not": "an array"})  # counts 0 bytes; the bound holds again
    assert list(lru) == ["small"] and lru.bytes == 0


def test_lru_count_bound_unchanged():
    from core.app_support import LRU
    lru = LRU(size=2)
    for k in range(4):
        assert lru.get_or(k, lambda k=k: k * 10) == k * 10
    assert list(lru) == [2, 3]
    assert lru.get_or(2, lambda: "recomputed") == 20  # a hit is not recomputed


def test_predictor_weights_frozen(tmp_path):
    from conftest import make_weights
    from core.inference import Predictor
    p = Predictor(make_weights(tmp_path / "w"))
    assert not any(q.requires_grad for q in p.model.parameters())


def test_cloud_entry_point_runs_the_app(random_weights, monkeypatch):
    """cloud/streamlit_app.py (Community Cloud's entry, beside the CPU-only requirements) is the
    same app: home page, and the pages found from there."""
    from streamlit.testing.v1 import AppTest
    monkeypatch.setenv("BT_WEIGHTS", str(random_weights))
    at = AppTest.from_file(str(REPO / "cloud" / "streamlit_app.py"), default_timeout=90).run()
    assert not at.exception
    assert at.title[0].value == "Brain tumour MRI classifier"
    at.switch_page(str(REPO / "app_pages" / "model_card.py")).run()
    assert not at.exception and at.title[0].value == "Model card"


def test_cloud_requirements_take_the_root_file():
    lines = (REPO / "cloud" / "requirements.txt").read_text().splitlines()
    assert "-r ../requirements.txt" in lines
    assert any(line.startswith("--extra-index-url ") and line.rstrip("/").endswith("/cpu")
               for line in lines)


def test_serving_precision_env_and_bf16_probabilities_match_fp32(tmp_path, monkeypatch):
    import numpy as np
    import torch

    from conftest import make_weights
    from core.inference import Predictor, serving_precision
    monkeypatch.setenv("BT_PRECISION", "fp32")
    assert serving_precision(torch.device("cpu")) == "fp32"
    w = make_weights(tmp_path / "w", arch="simple_cnn", size=64)
    x = torch.randn(3, 1, 64, 64)
    p32 = Predictor(w).probabilities(x)
    monkeypatch.setenv("BT_PRECISION", "bf16")
    pred16 = Predictor(w)
    assert pred16.precision == "bf16"
    p16 = pred16.probabilities(x)
    assert p16.dtype == np.float32 and np.allclose(p16.sum(1), 1, atol=1e-5)
    assert np.abs(p16 - p32).max() < 0.05   # bf16 keeps ~3 significant digits
    monkeypatch.setenv("BT_PRECISION", "auto")
    assert serving_precision(torch.device("cuda")) == "fp32"
