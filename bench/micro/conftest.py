"""pytest-benchmark set-up: ``bench/`` importable (``roofline``), torch's version and thread
count in the saved machine info. Threads follow torch's default or ``OMP_NUM_THREADS``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
