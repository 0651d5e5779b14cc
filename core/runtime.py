"""Process-wide memory settings for the app server. Import this before anything imports torch.

Streamlit Community Cloud gives the whole server process about 1 GB; what it costs is measured
by `bench/app_memory.py` (numbers in bench/README.md). Importing this module, once per process:

- caps glibc malloc at 2 arenas. Streamlit runs every script run in a new thread, and glibc
  gives threads arenas of their own (up to 8 per core), each of which keeps the memory freed in
  it; with two arenas the runs reuse each other's free memory. A cap set in the environment
  ($MALLOC_ARENA_MAX as a positive number, or glibc.malloc.arena_max in $GLIBC_TUNABLES) wins.
  Nothing happens where the C library is not glibc (macOS, Windows, musl).
- keeps `triton` from being imported. torchvision imports `torch._dynamo`, which loads triton
  when it is installed (it comes with PyPI's CUDA build of torch): about 75 MB resident that a
  CPU-only app never uses. Set BT_ALLOW_TRITON=1 (or true, yes, on) to let it load
  (torch.compile on a GPU).

`trim()` hands the heap's free pages back to the kernel; the app calls it after every run, so
an idle server does not hold the peak of its last prediction.
"""
from __future__ import annotations

import ctypes
import os
import re
import sys

M_ARENA_MAX = -8  # glibc <malloc.h>
ARENAS = 2


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc only (musl has no such function)
        return libc
    except (OSError, AttributeError):
        return None


def _arenas_given() -> bool:
    """Whether the environment already caps the arenas in a way glibc honours: a positive
    $MALLOC_ARENA_MAX (glibc ignores an empty or non-numeric one), or the tunable."""
    given = os.environ.get("MALLOC_ARENA_MAX", "").strip()
    tunable = re.search(r"malloc\.arena_max=(\d+)", os.environ.get("GLIBC_TUNABLES", ""))
    return (given.isdigit() and int(given) > 0) or bool(tunable and int(tunable.group(1)) > 0)


_LIBC = _glibc()
ARENAS_SET = bool(_LIBC is not None and not _arenas_given() and _LIBC.mallopt(M_ARENA_MAX, ARENAS) == 1)

if "triton" not in sys.modules and os.environ.get("BT_ALLOW_TRITON", "").strip().lower() not in ("1", "true", "yes", "on"):
    sys.modules["triton"] = None  # `import triton` now raises ImportError: torch carries on without


def trim() -> bool:
    """Return free heap memory to the kernel (glibc only); True when some was released."""
    return bool(_LIBC is not None and _LIBC.malloc_trim(0))
