"""What machine a timed benchmark ran on, recorded beside its seconds: machines of one kind differ
(the same job takes other seconds on an AMD EPYC and on an Intel Xeon), so every timed result says
which it ran on and what else was running. Standard library only: llm-compressor's venv imports it too."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_now() -> dict:
    """The CPU and the load average (1, 5, 15 min) at this moment."""
    return {"cpu": cpu_model(), "cpus": os.cpu_count(),
            "load_average_1_5_15_min_at_start": [round(x, 2) for x in os.getloadavg()]}
