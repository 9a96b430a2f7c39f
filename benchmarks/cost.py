"""What pruning costs, per method, measured in one run on a testbed.

    python benchmarks/cost.py --testbed default

- calibration wall time of each method (it records only what the method needs) as a ratio to one
  plain forward pass over the same calibration tokens;
- peak resident memory of the whole pruning job (`optimum-grape prune default ...` in a child
  process, load + calibrate + plan + apply + save) as a ratio to the model's weight bytes;
- GRAPE planning time at DeepSeek-V3 scale (58 MoE layers x 256 experts) from synthetic similarity
  matrices;
- parameters, weights on disk and greedy generation tokens/s before and after a 25% GRAPE prune.
Writes results/<testbed>/cost.json (list of per-method records) and cost_summary.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_testbed_argument, results_dir  # noqa: E402
from testbeds.registry import load_testbed, testbed  # noqa: E402

from optimum_grape import GrapeConfig, GrapePruner  # noqa: E402
from optimum_grape.algorithms.grape import grape_global_merge  # noqa: E402
from optimum_grape.calibration import calibration_batches, load_calibration_data  # noqa: E402
from optimum_grape.evaluation.perplexity import count_parameters, folder_bytes  # noqa: E402
from optimum_grape.methods import METHODS  # noqa: E402

CHILD = """
import resource, sys
if sys.argv[1] == "load-only":  # the floor: interpreter + torch + transformers + the loaded model
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(sys.argv[2])
    code = 0
else:
    from optimum_grape.cli import main
    code = main(sys.argv[1:])
print("PEAK_RSS_BYTES", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
sys.exit(code)
"""


REPEATS = 3  # each timing is the best of 3, after a warm-up pass


@torch.no_grad()
def forward_seconds(model, batches) -> float:
    def once() -> float:
        start = time.perf_counter()
        for batch in batches:
            model(input_ids=batch, use_cache=False)
        return time.perf_counter() - start

    once()
    return min(once() for _ in range(REPEATS))


def calibration_seconds(model, tok, method: str) -> float:
    def once() -> float:
        pruner = GrapePruner(GrapeConfig(method=method, pruning_ratio=0.25))
        start = time.perf_counter()
        pruner.calibrate(model, None, tok)
        return time.perf_counter() - start

    return min(once() for _ in range(REPEATS))


def peak_rss(model_path: Path, method: str | None) -> int:
    """Peak RSS of a child process running the whole pruning job (or, for None, only loading the model)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = ["load-only", str(model_path)] if method is None else [
            "prune", str(model_path), "--output", f"{tmp}/out", "--method", method, "--ratio", "0.25"]
        result = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return int(result.stdout.split("PEAK_RSS_BYTES")[-1].split()[0])


def planning_time(layers: int = 58, experts: int = 256, ratio: float = 0.25, seed: int = 0) -> float:
    gen = torch.Generator().manual_seed(seed)
    sims = {}
    for l in range(layers):
        s = torch.rand(experts, experts, generator=gen, dtype=torch.float64) * (0.5 + l / layers)
        sims[l] = (s + s.T) / 2
    start = time.perf_counter()
    grape_global_merge(sims, {l: 8 for l in sims}, int(ratio * layers * experts), 0.1,
                       caps={l: int(2 * ratio * experts) for l in sims})
    return time.perf_counter() - start


@torch.no_grad()
def generation_tokens_per_s(model, tok, new_tokens: int = 128) -> float:
    prompt = tok("The President said that the", return_tensors="pt")["input_ids"]
    model.generate(prompt, max_new_tokens=8, do_sample=False)  # warm-up
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return (out.shape[1] - prompt.shape[1]) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_testbed_argument(parser)
    args = parser.parse_args()
    model_path = testbed(args.testbed).path
    model, tok = load_testbed(args.testbed)
    config = GrapeConfig(pruning_ratio=0.25)
    batches = calibration_batches(load_calibration_data(None), tok, config.num_samples, config.sequence_length,
                                  config.batch_size)
    model_bytes = folder_bytes(model_path)
    forward_s = forward_seconds(model, batches)
    load_rss = peak_rss(model_path, None)
    print(f"peak RSS of a process that only loads the model: {load_rss / 1e6:.1f} MB", flush=True)
    print(f"plain forward over {sum(b.numel() for b in batches)} calibration tokens: {forward_s:.2f}s", flush=True)
    records = []
    calibration_seconds(model, tok, "grape")  # warm-up (first use registers and compiles paths)
    for name in sorted(METHODS):
        calib_s = calibration_seconds(model, tok, name)
        rss = peak_rss(model_path, name)
        rec = {"method": name, "calibration_s": calib_s, "forward_s": forward_s, "peak_rss_bytes": rss,
               "model_bytes": model_bytes, "calibration_over_forward": calib_s / forward_s,
               "peak_rss_over_model": rss / model_bytes, "peak_rss_over_load_only": rss / load_rss,
               "needs": sorted(METHODS[name].needs)}
        records.append(rec)
        print(f"{name:13s} calibration {calib_s:6.2f}s = {rec['calibration_over_forward']:5.2f}x forward; "
              f"peak RSS {rss / 1e6:7.1f} MB = {rec['peak_rss_over_model']:5.1f}x model weights = "
              f"{rec['peak_rss_over_load_only']:.2f}x loading alone", flush=True)

    plan_s = planning_time()
    print(f"GRAPE planning at DeepSeek-V3 scale (58 x 256, 25%): {plan_s:.2f}s", flush=True)
    params_before, gen_before = count_parameters(model), generation_tokens_per_s(model, tok)
    pruner = GrapePruner(config)
    pruner.prune(model, None, tok)
    with tempfile.TemporaryDirectory() as tmp:
        pruner.save_pretrained(model, Path(tmp) / "out", tok)
        bytes_after = folder_bytes(Path(tmp) / "out")
    params_after, gen_after = count_parameters(model), generation_tokens_per_s(model, tok)
    summary = {"testbed": args.testbed, "grape_planning_s_58x256": plan_s, "load_only_peak_rss_bytes": load_rss, "params_before": params_before, "params_after": params_after,
               "bytes_before": model_bytes, "bytes_after": bytes_after, "gen_tokens_per_s_before": gen_before,
               "gen_tokens_per_s_after": gen_after, "torch_threads": torch.get_num_threads()}
    print(f"parameters {params_before:,} -> {params_after:,} ({params_after / params_before:.3f}x); "
          f"disk {model_bytes / 1e6:.2f} -> {bytes_after / 1e6:.2f} MB ({bytes_after / model_bytes:.3f}x); "
          f"generation {gen_before:.1f} -> {gen_after:.1f} tok/s ({gen_after / gen_before:.2f}x)")
    out = results_dir(args.testbed)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost.json").write_text(json.dumps(records, indent=1) + "\n")
    (out / "cost_summary.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
