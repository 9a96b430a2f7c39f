"""`optimum-grape inspect`: the MoE layout of a pruned checkpoint, or with `--verify` its weight files
checked against the SHA-256 manifest."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import CheckpointError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="folder of a checkpoint written by optimum-grape")
    parser.add_argument("--verify", action="store_true",
                        help="check every weight file against the SHA-256 in grape_manifest.json: exit 1 and name "
                             "each file that differs")


def run(args) -> int:
    from ..checkpoint.save import read_config_json, read_plan

    if args.verify:
        return _verify(args.path)
    config = read_config_json(args.path)
    layout = (config.get("quantization_config") or {}).get("pruned_layout")
    print(f"model_type: {config.get('model_type')}")
    if not layout:
        print("not pruned by optimum-grape (no 'grape' quantization_config)")
        return 0
    before = layout.get("num_experts_before", {})
    print(f"method: {layout.get('method')}")
    print("layer  before  after")
    for layer, count in layout["experts_per_layer"].items():
        print(f"{int(layer):5d}  {before.get(layer, '?'):>6}  {count:>5}")
    plan = read_plan(args.path)
    if plan is not None:
        print(plan.summary())
    print(f"num_local_experts_per_layer: {config.get('num_local_experts_per_layer')}")
    return 0


def _verify(folder: str) -> int:
    """Exit 0 when every weight file matches grape_manifest.json, 1 (naming the files) otherwise."""
    from ..checkpoint.manifest import MANIFEST_FILE, verify_folder

    if not Path(folder).is_dir():
        raise CheckpointError(f"{folder!r} is not a folder; pass a checkpoint folder written by optimum-grape.")
    verified, problems = verify_folder(folder)
    for problem in problems:
        print(f"optimum-grape: verify: {problem}", file=sys.stderr)
    if problems:
        print(f"optimum-grape: verify: {folder} does NOT match its {MANIFEST_FILE} ({len(problems)} problem(s))",
              file=sys.stderr)
        return 1
    print(f"verified {len(verified)} weight file(s) against {MANIFEST_FILE}: OK")
    return 0
