"""Calibration across processes (calibration/distributed.py): two gloo processes under torchrun plan
what one process plans, from the same statistics."""

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import run_cli


def _torchrun(nproc: int, *args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_port", str(29500 + os.getpid() % 1000), "-m", "optimum_grape", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_two_gloo_processes_plan_what_one_process_plans(tmp_path):
    from optimum_grape.stats import ExpertStats

    common = ["prune", "default", "--ratio", "0.25", "--num-samples", "8", "--selection-samples", "4"]
    one = run_cli(*common, "--output", tmp_path / "one", "--save-stats", tmp_path / "one.safetensors")
    assert one.returncode == 0, one.stderr[-2000:]
    two = _torchrun(2, *common, "--output", tmp_path / "two", "--save-stats", tmp_path / "two.safetensors")
    assert two.returncode == 0, two.stderr[-3000:]
    plan_one, plan_two = (json.loads((tmp_path / n / "grape_plan.json").read_text()) for n in ("one", "two"))
    assert plan_one["clusters"] == plan_two["clusters"]
    a, b = ExpertStats.load(tmp_path / "one.safetensors"), ExpertStats.load(tmp_path / "two.safetensors")
    for layer in a.layers:
        for name in ("tokens", "weight_mass", "saliency", "max_output", "similarity"):
            x, y = getattr(a.layers[layer], name), getattr(b.layers[layer], name)
            assert torch.allclose(x, y, rtol=1e-9, atol=1e-12), (layer, name)
        assert a.layers[layer].sensitivity["kl"] == pytest.approx(b.layers[layer].sensitivity["kl"], rel=1e-9)
