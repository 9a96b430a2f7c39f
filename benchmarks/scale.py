"""Pruning a model bigger than the memory you want to spend on it: layer by layer from disk against
the in-memory path, on the same checkpoint and data, and calibration across two processes.

    python benchmarks/scale.py                 # ~4.5 GB Mixtral with random weights (built once, cached)
    python benchmarks/scale.py --layers 6      # smaller, for a quick look

1. Builds a Mixtral-architecture checkpoint with random weights (seeded; hidden 1024, 8 experts of
   2048, top-2, --layers decoder layers, 32k vocabulary, float32) under benchmarks/testbeds/cache/,
   with the shipped model's tokenizer.
2. Runs `optimum-grape prune` on it twice, each in a child process: in memory, then with
   --layer-by-layer; records wall time and peak resident memory (the child's ru_maxrss), and checks
   that both wrote the same plan and bit-identical weights.
3. Runs `torchrun --nproc_per_node 2` (gloo, loopback) on the shipped model and checks that its
   grape_plan.json has the clusters of the one-process run.

Writes results/scale.json and prints a summary. Same GRAPE default job both ways, calibrated on
8 sequences of 128 tokens of the shipped calibration text (2 held aside to score candidates).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
CACHE = BENCH / "testbeds" / "cache"
RESULTS = BENCH / "results"
JOB = ["--ratio", "0.25", "--num-samples", "8", "--sequence-length", "128", "--batch-size", "4",
       "--selection-samples", "2"]


def build(folder: Path, layers: int) -> None:
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from optimum_grape.checkpoint.load import default_model_path

    if (folder / "config.json").exists():
        return
    config = MixtralConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2048, num_hidden_layers=layers,
                           num_attention_heads=16, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=1024, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:  # trained-looking scale: unit-variance activations, routers that discriminate
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "gate.weight" in name else p.shape[-1] ** -0.5))
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # its frequencies: to_empty left them unset
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="1GB")
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(tmp)
    tmp.rename(folder)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# Runs the command given after it and reports the peak RSS of that command alone: a process's
# RUSAGE_CHILDREN is the largest child it ever waited for, so each measured job gets its own parent.
_PEAK_OF = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
            "print('peak_rss_kb', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
            "sys.exit(rc)")


def peak_rss(command: list[str], env=None) -> tuple[subprocess.CompletedProcess, int]:
    """Run `command` in a child; its result and its peak resident memory in bytes."""
    result = subprocess.run([sys.executable, "-c", _PEAK_OF, *command], capture_output=True, text=True, env=env)
    line = [ln for ln in result.stderr.splitlines() if ln.startswith("peak_rss_kb ")][-1]
    return result, int(line.split()[1]) * 1024


def prune(base: Path, out: Path, extra: list[str]) -> dict:
    """One `optimum-grape prune` child: wall time and peak RSS."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    result, peak = peak_rss([sys.executable, "-m", "optimum_grape", "prune", str(base), "--output", str(out), *JOB,
                             *extra])
    if result.returncode != 0:
        raise SystemExit(f"prune {' '.join(extra)} failed:\n{result.stderr[-3000:]}")
    return {"wall_s": round(time.perf_counter() - start, 1), "peak_rss_bytes": peak}


def import_floor() -> int:
    """Peak RSS of a process that only imports the CLI: what no pruning job can go below."""
    result, peak = peak_rss([sys.executable, "-c", "import optimum_grape.cli, transformers"])
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return peak


def same_output(a: Path, b: Path) -> dict:
    from safetensors import safe_open

    plan_a, plan_b = (json.loads((f / "grape_plan.json").read_text()) for f in (a, b))
    keys = {}
    for folder in (a, b):
        keys[folder] = {}
        for path in folder.glob("*.safetensors"):
            with safe_open(str(path), framework="pt") as handle:
                keys[folder].update({k: path for k in handle.keys()})
    equal = set(keys[a]) == set(keys[b])
    if equal:
        for key in keys[a]:  # one tensor at a time: never both checkpoints in memory
            with safe_open(str(keys[a][key]), framework="pt") as ha, safe_open(str(keys[b][key]), framework="pt") as hb:
                if not torch.equal(ha.get_tensor(key), hb.get_tensor(key)):
                    equal = False
                    break
    return {"plan_equal": plan_a == plan_b, "weights_equal": equal, "tensors": len(keys[a])}


def two_processes(work: Path) -> dict:
    common = ["prune", "default", "--ratio", "0.25", "--num-samples", "8", "--selection-samples", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for name, launcher in (("one", [sys.executable, "-m", "optimum_grape"]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                    "--master_port", "29611", "-m", "optimum_grape"])):
        shutil.rmtree(work / name, ignore_errors=True)
        start = time.perf_counter()
        result = subprocess.run([*launcher, *common, "--output", str(work / name)], capture_output=True, text=True,
                                env=env)
        if result.returncode != 0:
            raise SystemExit(f"{name}-process run failed:\n{result.stderr[-3000:]}")
        runs[name] = {"wall_s": round(time.perf_counter() - start, 1),
                      "plan": json.loads((work / name / "grape_plan.json").read_text())}
    return {"model": "default (shipped)", "backend": "gloo, loopback", "nproc": 2,
            "clusters_equal": runs["one"]["plan"]["clusters"] == runs["two"]["plan"]["clusters"],
            "experts_per_layer": runs["two"]["plan"]["experts_per_layer"],
            "wall_s": {k: v["wall_s"] for k, v in runs.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--work", type=Path, default=CACHE / "scale-runs")
    args = parser.parse_args()
    base = CACHE / f"scale-mixtral-{args.layers}L"
    start = time.perf_counter()
    build(base, args.layers)
    size = folder_bytes(base)
    print(f"model: {base} ({size / 1e9:.2f} GB of safetensors, built in {time.perf_counter() - start:.0f}s)", flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    floor = import_floor()
    print(f"a process that only imports optimum_grape and transformers: {floor / 1e9:.2f} GB", flush=True)
    layerwise = prune(base, args.work / "layer-by-layer", ["--layer-by-layer"])
    print(f"layer by layer: {layerwise['wall_s']}s, peak RSS {layerwise['peak_rss_bytes'] / 1e9:.2f} GB "
          f"({layerwise['peak_rss_bytes'] / size:.3f}x the model)", flush=True)
    memory = prune(base, args.work / "in-memory", [])
    print(f"in memory:      {memory['wall_s']}s, peak RSS {memory['peak_rss_bytes'] / 1e9:.2f} GB "
          f"({memory['peak_rss_bytes'] / size:.3f}x the model)", flush=True)
    same = same_output(args.work / "in-memory", args.work / "layer-by-layer")
    print(f"identical output: plan {same['plan_equal']}, weights {same['weights_equal']} ({same['tensors']} tensors)")
    torchrun = two_processes(args.work)
    print(f"torchrun 2 processes: clusters equal to 1 process: {torchrun['clusters_equal']}")
    record = {
        "model": {"architecture": "MixtralForCausalLM", "layers": args.layers, "hidden": 1024, "experts": 8,
                  "expert_intermediate": 2048, "vocab": 32000, "dtype": "float32", "bytes_on_disk": size},
        "job": "optimum-grape prune BASE " + " ".join(JOB),
        "import_only_peak_rss_bytes": floor,
        "layer_by_layer": {**layerwise, "peak_rss_over_model": round(layerwise["peak_rss_bytes"] / size, 3)},
        "in_memory": {**memory, "peak_rss_over_model": round(memory["peak_rss_bytes"] / size, 3)},
        "identical_output": same, "torchrun": torchrun, "cpu_threads": torch.get_num_threads(),
        "command": " ".join(["python", *sys.argv]),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(record, indent=1) + "\n")
    shutil.rmtree(args.work / "in-memory", ignore_errors=True)
    shutil.rmtree(args.work / "layer-by-layer", ignore_errors=True)
    return 0 if same["plan_equal"] and same["weights_equal"] and torchrun["clusters_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
