"""glibc malloc tuning for our processes.

On our conv DEQs glibc returning big blocks to the OS on every free cost up to 2.5x (measured
31 -> 80 img/s on 2 cores). The variables below only act at process start, so the CLI re-executes
itself once with them set; set ``DEQROBUST_MALLOC_TUNING=0`` to opt out.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping, Optional, Sequence

MALLOC_ENV: dict[str, str] = {
    # 32 MiB is glibc's ceiling for the mmap threshold; blocks below it come from the heap.
    "MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024),
    # Keep freed memory instead of trimming it back to the OS after every large free.
    "MALLOC_TRIM_THRESHOLD_": str(4 * 1024**3),
    # Grow the heap in 1 GiB steps.
    "MALLOC_TOP_PAD_": str(1024**3),
}
MARKER = "DEQROBUST_MALLOC_TUNED"


def malloc_env(base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with the malloc variables added."""
    env = dict(os.environ if base is None else base)
    for key, value in MALLOC_ENV.items():
        env.setdefault(key, value)
    env[MARKER] = "1"
    return env


def applies() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def reexec_with_malloc_tuning(argv: Sequence[str]) -> None:
    """Re-execute ``python -m deqrobust <argv>`` with the tuned environment (once; never returns
    when it acts). No-op off glibc, when already tuned, or when ``DEQROBUST_MALLOC_TUNING=0``."""
    if not applies() or os.environ.get(MARKER) == "1" or os.environ.get("DEQROBUST_MALLOC_TUNING", "1") == "0":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "deqrobust", *argv], malloc_env())
