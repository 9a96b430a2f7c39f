"""`optimum-grape publish`: prune a base into variants (methods x ratios), evaluate each against
the base on the shipped held-out text, refuse any whose perplexity ratio exceeds a threshold, and
upload the rest (token from `HF_TOKEN`), or with `--dry-run` write what would be uploaded.

What `.github/workflows/publish-variants.yml` runs, one matrix cell per call. Every variant lands
in `WORK_DIR/<method>-<percent>/` as a complete folder (weights, config, plan, model card, plot),
and `WORK_DIR/publish_manifest.json` lists each variant, its repository, its files and whether it
was pushed, would be pushed, or was refused and why. Exit status: 0 when nothing was refused,
3 when the quality gate refused a variant, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from ..errors import GrapeError

MANIFEST = "publish_manifest.json"
REFUSED_EXIT = 3


def _list(flag: str, text: str, kind=str) -> list:
    try:
        items = [kind(t.strip()) for t in text.split(",") if t.strip()]
    except ValueError:
        raise GrapeError(f"{flag} {text!r} must be a comma-separated list of {kind.__name__}s.") from None
    if not items:
        raise GrapeError(f"{flag} is empty; give at least one value.")
    return items


def variant_name(method: str, ratio: float) -> str:
    return f"{method}-{round(ratio * 100):d}"


def _files(folder: Path) -> list[dict]:
    """Every file of a variant with its size and SHA-256: the weight files' from the manifest the save
    just wrote (hashed once, in chunks), the small others hashed here, in chunks too."""
    from ..checkpoint.manifest import read_manifest, sha256_file

    manifest = read_manifest(folder)
    out = []
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            known = manifest.get(str(p.relative_to(folder)))
            size = p.stat().st_size
            digest = known["sha256"] if known and known["bytes"] == size else sha256_file(p)
            out.append({"path": str(p.relative_to(folder)), "bytes": size, "sha256": digest})
    return out


def _config(args, method: str, ratio: float):
    from ..config import GrapeConfig

    fields = dict(method=method, pruning_ratio=ratio, allocation=args.allocation, num_samples=args.num_samples,
                  sequence_length=args.sequence_length, seed=args.seed, dataset=args.dataset,
                  selection_samples=args.selection_samples, preset=args.preset)
    return GrapeConfig(**fields)


def publish_variant(args, method: str, ratio: float, work_dir: Path) -> dict:
    from ..checkpoint.save import push_folder
    from .prune_job import PruneJob, run_prune_job
    from ..pruner import GrapePruner

    name = variant_name(method, ratio)
    repo_id = f"{args.repo_prefix}-{name}"
    job = PruneJob(base=args.base, output=work_dir / name, evaluate=True, eval_tokens=args.eval_tokens,
                   window=args.sequence_length, base_model=args.base_model, overwrite=args.overwrite)
    report = run_prune_job(job, GrapePruner(_config(args, method, ratio)))
    worst = report.comparison["max_ratio"]
    entry = {"variant": name, "repo_id": repo_id, "method": method, "ratio": ratio, "folder": str(report.output),
             "experts_per_layer": list(report.plan.experts_per_layer.values()),
             "perplexity_before": report.before, "perplexity_after": report.after,
             "perplexity_ratios": report.comparison["ratios"], "max_perplexity_ratio": worst,
             "threshold": args.max_ppl_ratio}
    if worst > args.max_ppl_ratio:
        entry["status"] = "refused"
        entry["reason"] = (f"held-out perplexity ratio {worst:.3f} exceeds --max-ppl-ratio {args.max_ppl_ratio}; "
                           "raise the threshold, lower the ratio or pick another method to publish it")
    elif args.dry_run:
        from ..checkpoint.card import set_repo_id

        set_repo_id(report.output, repo_id)  # the card as it would be pushed
        entry["status"] = "would push"
        entry["files"] = _files(report.output)
    else:
        token = os.environ.get("HF_TOKEN")
        if not token:
            raise GrapeError("HF_TOKEN is not set; export a Hub token with write access, or pass --dry-run.")
        push_folder(report.output, repo_id, private=args.private, token=token)
        entry["status"] = "pushed"
        entry["files"] = _files(report.output)
    return entry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("base", help="model folder, cached Hub id, or 'default'")
    parser.add_argument("--methods", default="grape", help="comma-separated methods (default: grape)")
    parser.add_argument("--ratios", default="0.25", help="comma-separated pruning ratios in (0, 1) (default: 0.25)")
    parser.add_argument("--repo-prefix", required=True, metavar="ORG/NAME",
                        help="variants go to ORG/NAME-<method>-<percent>")
    parser.add_argument("--max-ppl-ratio", type=float, default=1.5,
                        help="refuse a variant whose held-out perplexity ratio (pruned / base, worst domain) exceeds "
                             "this (default 1.5)")
    parser.add_argument("--work-dir", default="grape-variants", help="where variants and the manifest are written (default: grape-variants)")
    parser.add_argument("--dry-run", action="store_true", help="write the folders and the manifest, upload nothing")
    parser.add_argument("--private", action="store_true", help="create the Hub repositories as private")
    parser.add_argument("--overwrite", action="store_true", help="replace variant folders left by an earlier run")
    parser.add_argument("--base-model", default=None, metavar="REPO_ID", help="Hub id of the base, for the cards")
    parser.add_argument("--allocation", choices=["global", "uniform"], default=None,
                        help="global or uniform allocation (default: each method's own)")
    parser.add_argument("--preset", choices=["default", "paper"], default="default", help="GRAPE preset (default: default)")
    parser.add_argument("--dataset", default=None, help="calibration text file or saved datasets folder (default: the shipped text)")
    parser.add_argument("--num-samples", type=int, default=64, help="calibration sequences (default: 64)")
    parser.add_argument("--sequence-length", type=int, default=256, help="tokens per sequence (default: 256)")
    parser.add_argument("--selection-samples", type=int, default=8,
                        help="sequences held aside to score candidate plans (default: 8)")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens per domain to score (default: 8192)")
    parser.add_argument("--seed", type=int, default=0, help="calibration seed (default: 0)")


def _read_manifest(path: Path) -> dict:
    """The manifest of an earlier run in this work dir, checked before any pruning: a damaged one is
    refused now rather than after every variant has been pruned and evaluated."""
    if not path.exists():
        return {"variants": []}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        manifest, why = None, f"cannot be read as JSON ({err})"
    else:
        why = "is not an object with a 'variants' list"
    if not (isinstance(manifest, dict) and isinstance(manifest.get("variants"), list)
            and all(isinstance(v, dict) and "variant" in v for v in manifest["variants"])):
        raise GrapeError(f"{path} {why}; move it away (it lists an earlier run's variants) or pass another "
                         "--work-dir.")
    return manifest


def run(args) -> int:
    from ..config import GrapeConfig
    from ..methods import get_method

    from .preflight import check_can_push, check_repo_id, check_threshold

    methods, ratios = _list("--methods", args.methods), _list("--ratios", args.ratios, float)
    for method in methods:
        get_method(method)
    for ratio in ratios:
        GrapeConfig(pruning_ratio=ratio)  # validates (0, 1) before any model is loaded
    names = [variant_name(m, r) for m in methods for r in ratios]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise GrapeError(f"--methods {args.methods!r} --ratios {args.ratios!r} give the variant name(s) {twice} "
                         "twice (a variant is named by its whole percent); give each ratio once, in whole percents.")
    check_threshold("--max-ppl-ratio", args.max_ppl_ratio, 1.0, "1.5 (no pruned model meets less than 1.0)")
    check_repo_id("--repo-prefix", f"{args.repo_prefix}-{names[0]}")
    if args.base_model is not None:
        check_repo_id("--base-model", args.base_model)
    if not args.dry_run:
        check_can_push("publish without --dry-run")
        if not os.environ.get("HF_TOKEN"):
            raise GrapeError("HF_TOKEN is not set; export a Hub token with write access, or pass --dry-run.")
    if not args.work_dir.strip():  # Path("") is ".", the current folder
        raise GrapeError("--work-dir is empty text; give a folder for the variants such as grape-variants.")
    work_dir = Path(args.work_dir)
    if work_dir.exists() and not work_dir.is_dir():
        raise GrapeError(f"--work-dir {args.work_dir!r} is a file, not a folder; pass a folder for the variants.")
    manifest_path = work_dir / MANIFEST
    manifest = _read_manifest(manifest_path)
    work_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for method in methods:
        for ratio in ratios:
            entry = publish_variant(args, method, ratio, work_dir)
            entries.append(entry)
            manifest["variants"] = [v for v in manifest["variants"] if v["variant"] != entry["variant"]] + [entry]
            manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            print(f"{entry['variant']:16s} {entry['status']:10s} -> {entry['repo_id']}  "
                  f"worst perplexity ratio {entry['max_perplexity_ratio']:.3f} (limit {args.max_ppl_ratio})"
                  + (f": {entry['reason']}" if entry["status"] == "refused" else ""))
    print(f"manifest: {manifest_path}")
    refused = [v for v in entries if v["status"] == "refused"]
    return REFUSED_EXIT if refused else 0
