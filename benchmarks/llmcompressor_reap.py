"""REAP expert pruning, optimum-grape against llm-compressor: the same model, the same calibration
tokens and the same cut, each job in its own child process; wall time, CPU time and peak RSS.

llm-compressor pins its own transformers, so it lives in a venv of its own (kept outside the
project; torch first, from the local CPU wheel, or pip pulls a multi-GB CUDA build):

    python3.11 -m venv /work/lc-venv
    /work/lc-venv/bin/pip install torch==2.13.0
    /work/lc-venv/bin/pip install llmcompressor==0.14.0.1

optimum-grape's job runs in a venv with what a user installs (`[plots]` draws the card's chart):

    python3.11 -m venv /work/og-venv
    /work/og-venv/bin/pip install torch==2.13.0
    /work/og-venv/bin/pip install -e ".[plots]"

Then, from the project's own venv (the model is built by `python benchmarks/scale.py --models mixtral-6L`):

    python benchmarks/llmcompressor_reap.py --og-python /work/og-venv/bin/python [--lc-python /work/lc-venv/bin/python]

The job, both ways: remove 2 of the 8 experts of every layer (25%, uniform) by REAP saliency (mean
over routed tokens of gate weight x expert output norm), calibrated on the 8 windows of 128 tokens
that optimum-grape samples from optimum_grape/data/calibration.txt (seed 0), batch size 4, one CPU
thread, pruned checkpoint written to disk. The token ids are computed once here and handed to
llm-compressor as a tokenized dataset, so both see exactly the same tokens. llm-compressor runs its
REAPPruningModifier through `oneshot` with every-expert calibration off (REAP scores routed tokens
only), twice:

- pipeline="basic": one forward pass of the unpruned model, then every layer is pruned; the same
  statistics as optimum-grape's, so the same experts are kept. This is the matched job.
- pipeline="sequential" (what oneshot picks for REAP by default), propagate_error=False: layer by
  layer on the unpruned layers' outputs. With this model and llmcompressor 0.14.0.1 it calibrates
  with non-causal attention (see DIFFERENCES), so it is timed as shipped but keeps other experts.

Each job runs `--repeats` times (default 3), the jobs in turn, and every figure is the job's median;
each trial is recorded too. Writes results/llmcompressor_reap.json and prints a side-by-side table.
This script also is the llm-compressor child (`lc-job`, run under --lc-python): it imports only the
standard library at the top so that the other venv can run it.
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

from machine import machine_now  # standard library only, like every import at the top here

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CACHE = BENCH / "testbeds" / "cache"
RESULTS = BENCH / "results"
DEFAULT_MODEL = CACHE / "scale-mixtral-6L"
CALIBRATION = ROOT / "optimum_grape" / "data" / "calibration.txt"
RATIO, NUM_SAMPLES, SEQUENCE_LENGTH, BATCH_SIZE, SEED = 0.25, 8, 128, 4, 0

# One thread everywhere, offline everywhere: the comparison is per-core work, and nothing may
# reach for the Hub.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# ---------------------------------------------------------------- the llm-compressor child

def lc_job(model_path: str, output: str, ids_path: str, report: str, pipeline: str) -> None:
    """llm-compressor's REAP on `model_path` through its `pipeline` calibration pipeline, run under
    the llm-compressor venv."""
    import torch

    torch.set_num_threads(1)
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import load_quantizable_moe, repack_moe
    from llmcompressor.modifiers.pruning.reap import REAPPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = json.loads(Path(ids_path).read_text())
    # Already tokenized (an input_ids column): llm-compressor uses it as is, no re-tokenizing.
    dataset = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]})
    # The documented way to load an MoE for llm-compressor: REAP hooks one Linear per expert
    # projection. It has no load mapping for Mixtral, so this loads the fused experts and then
    # splits them ("linearized after loading"), as oneshot would on its own.
    with load_quantizable_moe():
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    oneshot(
        model=model,
        dataset=dataset,
        recipe=REAPPruningModifier(sparsity=RATIO, report_path=report),
        num_calibration_samples=len(ids),
        max_seq_length=SEQUENCE_LENGTH,
        batch_size=BATCH_SIZE,
        shuffle_calibration_samples=False,  # the windows in optimum-grape's order
        moe_calibrate_all_experts=False,  # REAP scores routed tokens only; its own log says to turn this off
        propagate_error=False,  # sequential only: each layer fed the unpruned layers' outputs, as optimum-grape
        pipeline=pipeline,
    )
    # Saved as oneshot(output_dir=...) would, Mixtral's experts come out as per-expert
    # gate/up/down_proj Linears that transformers does not map back (its Mixtral keys are w1/w2/w3
    # or fused): the experts would load as random weights. repack_moe restores the native fused
    # experts first, as its docstring advises for architectures that expect packed experts.
    repack_moe(model)
    model.save_pretrained(output)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(output)


# ---------------------------------------------------------------- measuring

def run_measured(command: list[str]) -> dict:
    """Run `command` under its own parent (scale.py's `measured`): wall seconds, user+sys CPU seconds
    and peak RSS bytes."""
    from scale import measured  # imports torch: only here, never in the llm-compressor child

    start = time.perf_counter()
    result, peak, cpu = measured(command, env=ENV)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_rss_bytes": peak}


def warm_page_cache(folder: Path) -> None:
    """Read the checkpoint once so neither job pays for (or is helped by) a cold disk."""
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as handle:
            while handle.read(1 << 24):
                pass


# ---------------------------------------------------------------- the two jobs

def calibration_ids(model: Path) -> list[list[int]]:
    """The windows optimum-grape's CLI calibrates on (its sampler, the model's tokenizer, seed 0)."""
    from transformers import AutoTokenizer

    from optimum_grape.calibration.data import load_calibration_data, sample_windows

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    documents = load_calibration_data(str(CALIBRATION))  # what the CLI's --dataset FILE resolves to
    return sample_windows(documents, tokenizer, SEQUENCE_LENGTH, NUM_SAMPLES, 0, SEED).windows.tolist()


def grape_command(python: str, model: Path, output: Path) -> list[str]:
    return [python, "-m", "optimum_grape", "prune", str(model), "--output", str(output), "--method", "reap",
            "--allocation", "uniform", "--ratio", str(RATIO), "--num-samples", str(NUM_SAMPLES), "--sequence-length",
            str(SEQUENCE_LENGTH), "--batch-size", str(BATCH_SIZE), "--selection-samples", "0", "--seed", str(SEED),
            "--dataset", str(CALIBRATION)]


def lc_command(lc_python: str, model: Path, output: Path, ids_path: Path, report: Path, pipeline: str) -> list[str]:
    return [lc_python, str(Path(__file__).resolve()), "lc-job", "--model", str(model), "--output", str(output),
            "--ids", str(ids_path), "--report", str(report), "--pipeline", pipeline]


def grape_kept(output: Path) -> dict[str, list[int]]:
    """Experts each layer keeps, from the plan optimum-grape writes beside the checkpoint."""
    plan = json.loads((output / "grape_plan.json").read_text())
    return {str(layer): sorted(cluster[0] for cluster in clusters) for layer, clusters in plan["clusters"].items()}


def lc_kept(report: Path) -> dict[str, list[int]]:
    """Experts each layer keeps, from REAPPruningModifier's report (keyed by module name)."""
    kept = json.loads(report.read_text())
    return {name.split(".layers.")[1].split(".")[0]: sorted(experts) for name, experts in kept.items()}


def versions(python: str) -> dict:
    code = ("import importlib.metadata as m, json; "
            "print(json.dumps({p: m.version(p) for p in ('torch', 'transformers', 'llmcompressor', "
            "'compressed-tensors', 'optimum-grape', 'torchao', 'matplotlib') "
            "if p in {d.metadata['Name'] for d in m.distributions()}}))")
    # From / : run in the project folder, importlib.metadata would also find optimum-grape's
    # egg-info there and report it for a venv that does not have it.
    return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True, cwd="/").stdout)


def checkpoint_summary(folder: Path) -> dict:
    """What each job wrote: its size and the expert count its config declares."""
    from scale import folder_bytes

    config = json.loads((folder / "config.json").read_text())
    return {"bytes_on_disk": folder_bytes(folder), "num_local_experts": config.get("num_local_experts")}


# ---------------------------------------------------------------- reporting

# What still differs between the jobs after matching everything that can be matched.
DIFFERENCES = [
    "transformers 5.25 (optimum-grape's venv) against 5.17 (pinned by llmcompressor 0.14.0.1); same torch.",
    ("Attention: optimum-grape runs the model's sdpa attention; llm-compressor forces eager attention while "
     "calibrating. With the basic pipeline the saliencies agree to about 1e-5 relative, not bit for bit."),
    ("Experts: llm-compressor loads Mixtral's fused 3D experts, splits them into one Linear per projection "
     "(no load mapping for Mixtral, so a second copy of the expert weights) and, to write a checkpoint that "
     "transformers loads, repack_moe fuses them back before saving; optimum-grape slices the fused tensors."),
    ("Saving: oneshot(output_dir=...) would write Mixtral experts as experts.N.{gate,up,down}_proj, which "
     "transformers 5.x does not map (the experts load as random weights), so the job calls repack_moe and "
     "model.save_pretrained itself (one 1.2 GB shard); optimum-grape writes 7 shards plus grape_plan.json, "
     "a manifest and a model card with a PNG chart."),
    ("optimum-grape also records per-layer token samples and output maxima it uses for other methods; "
     "llm-compressor's hooks record REAP sums only."),
    ("Pipelines: 'basic' is one forward pass of the whole unpruned model, then all layers are pruned: the "
     "same statistics as optimum-grape. 'sequential' (llm-compressor's default for REAP) runs decoder layer "
     "by layer with propagate_error=False (inputs from unpruned layers), but here calibrates with "
     "non-causal attention: the traced graph rebuilds the config without the forced eager attention, "
     "create_causal_mask returns None for unpadded batches, and eager attention without a mask attends "
     "both ways. Its saliencies and kept experts therefore differ."),
]


LABELS = {"optimum_grape": "optimum-grape", "llm_compressor": "lc (basic)",
          "llm_compressor_sequential": "lc (sequential)"}


def table(runs: dict, reference: str = "optimum_grape") -> str:
    """Each job's numbers, then optimum-grape's over each llm-compressor job's."""
    others = [name for name in runs if name != reference]
    rows = [("wall s", "wall_s", 1), ("CPU s (user+sys)", "cpu_s", 1), ("peak RSS GB", "peak_rss_bytes", 1e9)]
    lines = [f"{'':18}" + "".join(f"{LABELS[n]:>17}" for n in runs)
             + "".join(f"{'og / ' + LABELS[n]:>22}" for n in others)]
    for label, key, scale in rows:
        lines.append(f"{label:18}" + "".join(f"{runs[n][key] / scale:>17.2f}" for n in runs)
                     + "".join(f"{runs[reference][key] / runs[n][key]:>22.3f}" for n in others))
    return "\n".join(lines)


def compare(args) -> int:
    # absolute, not resolve: testbeds/cache may be a symlink, and the record names the project path
    model = args.model.absolute()
    if not (model / "config.json").exists():
        raise SystemExit(f"{model} not found: build it with `python benchmarks/scale.py --models mixtral-6L`.")
    work = args.work.absolute()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ids_path = work / "calibration_ids.json"
    ids_path.write_text(json.dumps(calibration_ids(model)))
    size = checkpoint_summary(model)["bytes_on_disk"]
    commands = {"optimum_grape": grape_command(args.og_python, model, work / "optimum_grape"),
                "llm_compressor": lc_command(args.lc_python, model, work / "llm_compressor", ids_path,
                                             work / "llm_compressor.json", "basic"),
                "llm_compressor_sequential": lc_command(args.lc_python, model, work / "llm_compressor_sequential",
                                                        ids_path, work / "llm_compressor_sequential.json",
                                                        "sequential")}
    warm_page_cache(model)
    machine = machine_now()
    # Round robin, not one job's repeats in a row: a slow spell of the machine (another process, the
    # page cache) then lands on every job alike; each job's figure is the median of its repeats.
    trials = {name: [] for name in commands}
    for repeat in range(args.repeats):
        for name, command in commands.items():
            print(f"running {name} ({repeat + 1}/{args.repeats}): {' '.join(command)}", flush=True)
            shutil.rmtree(work / name, ignore_errors=True)  # every trial writes a fresh checkpoint
            # The last trial's 1.2 GB of dirty pages would throttle this one's writes: start each clean.
            os.sync()
            trials[name].append(run_measured(command))
            last = trials[name][-1]
            print(f"  {last['wall_s']} s wall, {last['cpu_s']} s CPU, {last['peak_rss_bytes'] / 1e9:.2f} GB peak RSS",
                  flush=True)
    runs = {name: {key: statistics.median(t[key] for t in runs_) for key in runs_[0]}
            for name, runs_ in trials.items()}
    kept = {name: grape_kept(work / name) if name == "optimum_grape" else lc_kept(work / f"{name}.json")
            for name in commands}
    outputs = {name: checkpoint_summary(work / name) for name in commands}
    print(table(runs))
    same = {name: kept[name] == kept["optimum_grape"] for name in commands if name != "optimum_grape"}
    print(f"same experts kept as optimum-grape in every layer: {same}")
    grape = runs["optimum_grape"]
    record = {
        "model": {"path": str(model.relative_to(ROOT)) if model.is_relative_to(ROOT) else str(model),
                  "architecture": "MixtralForCausalLM", "layers": len(kept["optimum_grape"]), "experts": 8,
                  "dtype": "float32", "bytes_on_disk": size},
        "job": {"ratio": RATIO, "allocation": "uniform", "saliency": "REAP", "num_samples": NUM_SAMPLES,
                "sequence_length": SEQUENCE_LENGTH, "batch_size": BATCH_SIZE, "seed": SEED, "cpu_threads": 1,
                "calibration": str(CALIBRATION.relative_to(ROOT))},
        "commands": {k: " ".join(v) for k, v in commands.items()},
        "versions": {"optimum_grape_venv": versions(args.og_python), "llm_compressor_venv": versions(args.lc_python)},
        "repeats": args.repeats,
        "results": {k: {"wall_s": v["wall_s"], "cpu_s": v["cpu_s"], "peak_rss_bytes": v["peak_rss_bytes"],
                        "peak_rss_over_model": round(v["peak_rss_bytes"] / size, 3),
                        "trials": trials[k]} for k, v in runs.items()},
        "ratio_optimum_grape_over": {
            name: {key: round(grape[key] / runs[name][key], 3) for key in ("wall_s", "cpu_s", "peak_rss_bytes")}
            for name in commands if name != "optimum_grape"},
        "experts_kept_per_layer": kept,
        "same_experts_kept_as_optimum_grape": same,
        "pruned_checkpoints": outputs,
        "differences": DIFFERENCES,
        # What else the machine was doing, measured rather than asserted: CPU seconds are steadier than wall.
        **machine,
        "command": " ".join(["python", *sys.argv]),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "llmcompressor_reap.json").write_text(json.dumps(record, indent=1) + "\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("lc-job", help="(internal) the llm-compressor job, run under --lc-python")
    for option in ("--model", "--output", "--ids", "--report", "--pipeline"):
        child.add_argument(option, required=True)
    parser.add_argument("--lc-python", default="/work/lc-venv/bin/python",
                        help="python of the venv with llmcompressor installed")
    parser.add_argument("--og-python", default=sys.executable,
                        help="python of the venv that runs optimum-grape's job (default: this one); a venv with "
                             "only `pip install -e .[plots]` is what a user has (this project's test venv also "
                             "has torchao, which transformers imports at start-up)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--work", type=Path, default=CACHE / "llmcompressor-reap-runs")
    parser.add_argument("--keep", action="store_true", help="keep both pruned checkpoints under --work")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each job, round robin; the results are each job's medians (default 3)")
    args = parser.parse_args()
    if args.command == "lc-job":
        lc_job(args.model, args.output, args.ids, args.report, args.pipeline)
        return 0
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
