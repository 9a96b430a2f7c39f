"""What pruning a big model costs in memory and time: in memory against layer by layer from disk, and
calibration against a plain forward, on models shaped like the ones users prune; plus calibration
across two processes.

    python benchmarks/scale.py                          # the three models below, then torchrun
    python benchmarks/scale.py --models mixtral-6L      # one model, for a quick look
    python benchmarks/scale.py --repeats 3              # each job 3 times, alternating: medians
    python benchmarks/scale.py --device cuda            # where a GPU is lent: the same, on it

Models (random weights, seeded, float32, built once under benchmarks/testbeds/cache/ with the
shipped model's tokenizer; trained-looking scales so that routers discriminate):
- `mixtral-6L`: Mixtral architecture, hidden 1024, 8 experts of 2048, top-2, 6 layers (1.53 GB);
- `mixtral-20L`: the same with 20 layers (4.50 GB);
- `qwen3moe-128e`: fine-grained like Qwen3-30B-A3B scaled down: 128 experts of 256, top-8, hidden
  512, 8 layers (1.74 GB), where per-expert work is largest.

Per model:
0. Loading alone: a child that imports what a job imports and loads the model as the CLI does, then
   stops; its peak RSS / model is the least any in-memory job on that model can hold.
1. `optimum-grape prune` (the default GRAPE job at 25%, calibrated on 8 x 128 tokens, 2 held aside)
   in its own child process, in memory and with --layer-by-layer: wall time, CPU time (user + sys)
   and peak resident memory (the child's ru_maxrss), as a ratio to the model's bytes on disk; both
   outputs compared (same plan, bit-identical weights).
2. Calibration against a forward (mixtral-6L, qwen3moe-128e), in one child that loads the model once:
   a plain forward over the calibration and held-aside windows, then `GrapePruner.calibrate` of
   grape, frequency and reap on the same windows (GRAPE's includes its sensitivity probe). Two
   calibration sizes: the job's (8 x 128 + 2) and GrapeConfig's defaults (64 x 256 + 8).
Then `torchrun --nproc_per_node 2` (gloo, loopback) on the shipped model, whose grape_plan.json
must have the clusters of the one-process run.

Writes results/scale.json and prints a summary. One CPU thread per job (OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from machine import machine_now  # noqa: E402

CACHE = BENCH / "testbeds" / "cache"
RESULTS = BENCH / "results"
JOB = ["--ratio", "0.25", "--num-samples", "8", "--sequence-length", "128", "--batch-size", "4",
       "--selection-samples", "2"]
CALIBRATION_SIZES = {"job": {"num_samples": 8, "sequence_length": 128, "batch_size": 4, "selection_samples": 2},
                     "defaults": {}}
CALIBRATED_METHODS = ("grape", "frequency", "reap")


def _mixtral(layers: int):
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2048, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                         max_position_embeddings=1024, tie_word_embeddings=False)


def _qwen3moe_128e():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
                          num_experts=128, num_experts_per_tok=8, num_hidden_layers=8, num_attention_heads=8,
                          num_key_value_heads=4, head_dim=64, max_position_embeddings=1024, norm_topk_prob=True,
                          tie_word_embeddings=False)


MODELS = {"mixtral-6L": lambda: _mixtral(6), "mixtral-20L": lambda: _mixtral(20), "qwen3moe-128e": _qwen3moe_128e}
# Which models get the calibration-against-forward measurement (the two shapes).
CALIBRATION_MODELS = ("mixtral-6L", "qwen3moe-128e")


def build(name: str) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_grape.checkpoint.load import default_model_path

    folder = CACHE / f"scale-{name}"
    if (folder / "config.json").exists():
        return folder
    config = MODELS[name]()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param_name, p in model.named_parameters():
            if "norm" in param_name:
                p.fill_(1.0)
            else:  # trained-looking scale: unit-variance activations, routers that discriminate
                scale = 0.5 if param_name.endswith("mlp.gate.weight") else p.shape[-1] ** -0.5
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # its frequencies: to_empty left them unset
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="1GB")
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# Runs the command given after it and reports the peak RSS and CPU time of that command alone: a
# process's RUSAGE_CHILDREN is the largest child it ever waited for, so each measured job gets its own parent.
_MEASURED = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
             "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
             "print('measured', u.ru_maxrss, u.ru_utime + u.ru_stime, file=sys.stderr); sys.exit(rc)")


def measured(command: list[str], env=None) -> tuple[subprocess.CompletedProcess, int, float]:
    """Run `command` in a child; its result, its peak resident memory in bytes and its CPU seconds."""
    result = subprocess.run([sys.executable, "-c", _MEASURED, *command], capture_output=True, text=True, env=env)
    line = [ln for ln in result.stderr.splitlines() if ln.startswith("measured ")][-1]
    return result, int(line.split()[1]) * 1024, float(line.split()[2])


def one_thread() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def prune(base: Path, out: Path, extra: list[str], size: int) -> dict:
    """One `optimum-grape prune` child: wall and CPU time, peak RSS."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    result, peak, cpu = measured([sys.executable, "-m", "optimum_grape", "prune", str(base), "--output", str(out),
                                  *JOB, *extra], env=one_thread())
    if result.returncode != 0:
        raise SystemExit(f"prune {' '.join(extra)} failed:\n{result.stderr[-3000:]}")
    return {"wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(cpu, 1), "peak_rss_bytes": peak,
            "peak_rss_over_model": round(peak / size, 3)}


def child_peak(code: str, *args: str, env=None) -> int:
    """Peak RSS of a `python -c code args` child, which must succeed."""
    result, peak, _ = measured([sys.executable, "-c", code, *args], env=env)
    if result.returncode != 0:
        raise SystemExit(f"{code!r} failed:\n{result.stderr[-3000:]}")
    return peak


def import_floor() -> int:
    """Peak RSS of a process that imports what a pruning job imports, and loads nothing."""
    return child_peak("import optimum_grape.pruner, transformers.modeling_utils")


def load_only(base: Path, size: int) -> dict:
    """Peak RSS of a process that imports what a pruning job imports and loads the model as the CLI
    does (`load_model_and_tokenizer`), then stops: the least any in-memory job on this model can hold."""
    peak = child_peak("import sys, optimum_grape.pruner; from optimum_grape.checkpoint.load import "
                      "load_model_and_tokenizer; load_model_and_tokenizer(sys.argv[1])", str(base), env=one_thread())
    return {"peak_rss_bytes": peak, "peak_rss_over_model": round(peak / size, 3)}


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
    for plan in (plan_a, plan_b):  # how long it took is not part of the result
        plan.get("metadata", {}).pop("timings", None)
    return {"plan_equal": plan_a == plan_b, "weights_equal": equal, "tensors": len(keys[a])}


# The child that measures calibration against a forward: the model is loaded once, as the CLI loads it.
_CALIBRATION_CHILD = r"""
import json, sys, time
import torch
from optimum_grape import GrapeConfig, GrapePruner
from optimum_grape.checkpoint.load import load_model_and_tokenizer

torch.set_num_threads(1)
path, device, sizes, methods = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4].split(",")
model, tok = load_model_and_tokenizer(path, device=device)
sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
out = {}
for size_name, size in sizes.items():
    probe = GrapePruner(GrapeConfig(pruning_ratio=0.25, **size))
    batches = probe.prepare_data(None, tok, model) + probe.selection_batches
    with torch.no_grad():
        for b in batches[:1]:
            model(input_ids=b.to(device), use_cache=False)  # warm-up
        sync(); start = time.perf_counter()
        for b in batches:
            model(input_ids=b.to(device), use_cache=False)
        sync(); forward = time.perf_counter() - start
    rows = {"tokens": sum(b.numel() for b in batches), "forward_s": round(forward, 2), "methods": {}}
    for method in methods:
        pruner = GrapePruner(GrapeConfig(method=method, pruning_ratio=0.25, **size))
        sync(); start = time.perf_counter()
        pruner.calibrate(model, None, tok)
        sync(); seconds = time.perf_counter() - start
        rows["methods"][method] = {"calibration_s": round(seconds, 2),
                                   "calibration_over_forward": round(seconds / forward, 2)}
    out[size_name] = rows
print("RESULT " + json.dumps(out))
"""


def calibration_against_forward(base: Path, device: str) -> dict:
    sizes = json.dumps(CALIBRATION_SIZES)
    result = subprocess.run([sys.executable, "-c", _CALIBRATION_CHILD, str(base), device, sizes,
                             ",".join(CALIBRATED_METHODS)], capture_output=True, text=True, env=one_thread())
    if result.returncode != 0:
        raise SystemExit(f"calibration timing failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.split("RESULT ")[-1])


def two_processes(work: Path) -> dict:
    common = ["prune", "default", "--ratio", "0.25", "--num-samples", "8", "--selection-samples", "4"]
    runs = {}
    for name, launcher in (("one", [sys.executable, "-m", "optimum_grape"]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                    "--master_port", "29611", "-m", "optimum_grape"])):
        shutil.rmtree(work / name, ignore_errors=True)
        start = time.perf_counter()
        result = subprocess.run([*launcher, *common, "--output", str(work / name)], capture_output=True, text=True,
                                env=one_thread())
        if result.returncode != 0:
            raise SystemExit(f"{name}-process run failed:\n{result.stderr[-3000:]}")
        runs[name] = {"wall_s": round(time.perf_counter() - start, 1),
                      "plan": json.loads((work / name / "grape_plan.json").read_text())}
    return {"model": "default (shipped)", "backend": "gloo, loopback", "nproc": 2,
            "clusters_equal": runs["one"]["plan"]["clusters"] == runs["two"]["plan"]["clusters"],
            "experts_per_layer": runs["two"]["plan"]["experts_per_layer"],
            "wall_s": {k: v["wall_s"] for k, v in runs.items()}}


def summary_of(runs: list[dict], size: int) -> dict:
    """One mode's runs: median wall and CPU time, the largest peak (what a user must provision for),
    and each run when there were several."""
    peak = max(r["peak_rss_bytes"] for r in runs)
    return {"wall_s": round(statistics.median(r["wall_s"] for r in runs), 1),
            "cpu_s": round(statistics.median(r["cpu_s"] for r in runs), 1),
            "peak_rss_bytes": peak, "peak_rss_over_model": round(peak / size, 3),
            **({"runs": runs} if len(runs) > 1 else {})}


def measure_model(name: str, work: Path, device: str, repeats: int = 1) -> dict:
    base = build(name)
    size = folder_bytes(base)
    config = json.loads((base / "config.json").read_text())
    print(f"\n{name}: {base} ({size / 1e9:.2f} GB of safetensors)", flush=True)
    extra = [] if device == "cpu" else ["--device", device]
    record = {"architecture": config["architectures"][0], "layers": config["num_hidden_layers"],
              "hidden": config["hidden_size"], "experts": config.get("num_local_experts", config.get("num_experts")),
              "top_k": config["num_experts_per_tok"], "dtype": "float32", "bytes_on_disk": size}
    record["load_only"] = load_only(base, size)
    print(f"  load only       peak RSS {record['load_only']['peak_rss_bytes'] / 1e9:5.2f} GB = "
          f"{record['load_only']['peak_rss_over_model']:.3f}x the model", flush=True)
    trials = {"in_memory": [], "layer_by_layer": []}
    for _ in range(repeats):  # the modes alternate, so a slow spell of the machine falls on both
        trials["in_memory"].append(prune(base, work / "in-memory", extra, size))
        if device == "cpu":  # layer by layer runs on the CPU only
            trials["layer_by_layer"].append(prune(base, work / "layer-by-layer", ["--layer-by-layer"], size))
    runs = {mode: summary_of(done, size) for mode, done in trials.items() if done}
    for mode, run in runs.items():
        print(f"  {mode:15s} wall {run['wall_s']:7.1f}s  CPU {run['cpu_s']:7.1f}s  peak RSS "
              f"{run['peak_rss_bytes'] / 1e9:5.2f} GB = {run['peak_rss_over_model']:.3f}x the model", flush=True)
    record.update(runs)
    if "layer_by_layer" in runs:
        record["layer_by_layer_over_in_memory"] = {
            "wall": round(runs["layer_by_layer"]["wall_s"] / runs["in_memory"]["wall_s"], 3),
            "cpu": round(runs["layer_by_layer"]["cpu_s"] / runs["in_memory"]["cpu_s"], 3)}
        record["identical_output"] = same_output(work / "in-memory", work / "layer-by-layer")
        print(f"  layer by layer / in memory: wall {record['layer_by_layer_over_in_memory']['wall']}x, CPU "
              f"{record['layer_by_layer_over_in_memory']['cpu']}x; identical output: {record['identical_output']}",
              flush=True)
    for folder in ("in-memory", "layer-by-layer"):
        shutil.rmtree(work / folder, ignore_errors=True)
    if name in CALIBRATION_MODELS:
        record["calibration"] = calibration_against_forward(base, device)
        for size_name, rows in record["calibration"].items():
            ratios = ", ".join(f"{m} {r['calibration_over_forward']}x" for m, r in rows["methods"].items())
            print(f"  calibration / forward ({size_name}: {rows['tokens']} tokens, forward {rows['forward_s']}s): "
                  f"{ratios}", flush=True)
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--device", default="cpu", help="cpu, or cuda where a GPU is lent (in-memory jobs only)")
    parser.add_argument("--no-torchrun", action="store_true", help="skip the two-process run")
    parser.add_argument("--work", type=Path, default=CACHE / "scale-runs")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each mode per model, alternating; wall and CPU are their medians, the peak their largest")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    floor = import_floor()
    print(f"a process that imports what a pruning job imports, and loads nothing: {floor / 1e9:.2f} GB", flush=True)
    path = RESULTS / ("scale.json" if args.device == "cpu" else f"scale_{args.device.split(':')[0]}.json")
    record = json.loads(path.read_text()) if path.exists() else {}
    if "models" not in record:  # a results file of the earlier layout is replaced whole
        record = {"models": {}}
    record.update({"job": "optimum-grape prune BASE " + " ".join(JOB), "import_only_peak_rss_bytes": floor,
                   "cpu_threads": 1, "device": args.device})
    record.pop("command", None)  # each model (and the torchrun run) records its own
    command = " ".join(["python", *sys.argv])
    for name in args.models:
        # What else the machine was doing when this model's runs began, measured rather than asserted;
        # models of one results file may come from different runs, so each says which.
        started = {"command": command, "date": time.strftime("%Y-%m-%d"), **machine_now()}
        record["models"][name] = {**measure_model(name, args.work, args.device, args.repeats),
                                  "repeats": args.repeats, "measured": started}
        RESULTS.mkdir(exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")  # after each model: a long run keeps what it measured
    ok = all(m.get("identical_output", {}).get("weights_equal", True) and
             m.get("identical_output", {}).get("plan_equal", True) for m in record["models"].values())
    if not args.no_torchrun and args.device == "cpu":
        record["torchrun"] = {**two_processes(args.work), "measured": {"command": command,
                                                                        "date": time.strftime("%Y-%m-%d"), **machine_now()}}
        print(f"torchrun 2 processes: clusters equal to 1 process: {record['torchrun']['clusters_equal']}")
        ok = ok and record["torchrun"]["clusters_equal"]
        path.write_text(json.dumps(record, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
