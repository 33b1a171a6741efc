"""Facts about the machine this process runs on, for the parts that size their thread pools
(the probes' C grid, the extractor's threads on a GPU). Imports nothing heavy: train and
evaluate use it without torch, extract without scikit-learn."""

from __future__ import annotations

import os


def cores() -> int:
    """The CPU cores this process may run on: its affinity where the OS says (e.g. under a
    cluster's scheduler or `taskset`), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
