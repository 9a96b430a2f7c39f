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
    before, after = layout.get("num_experts_before"), layout.get("experts_per_layer")
    for name, value in (("num_experts_before", before), ("experts_per_layer", after)):
        if not isinstance(value, dict) or not all(str(k).isdigit() and isinstance(v, int) for k, v in value.items()):
            raise CheckpointError(f"{args.path}: config.json's pruned_layout.{name} is {type(value).__name__} "
                                  f"{str(value)[:80]}, not an object {{layer: count}}; the config was edited or damaged "
                                  "(restore it from the checkpoint's source).")
    print(f"method: {layout.get('method')}")
    print("layer  before  after")
    for layer, count in after.items():
        print(f"{int(layer):5d}  {before.get(layer, '?'):>6}  {count:>5}")
    plan = read_plan(args.path)
    if plan is not None:
        print(plan.summary())
    per_layer = config.get("num_local_experts_per_layer")
    print(f"num_local_experts_per_layer: {per_layer}")
    counted = [c for c in per_layer or [] if c is not None]
    if per_layer is not None and counted != list(after.values()):
        print(f"optimum-grape: inspect: MISMATCH: num_local_experts_per_layer {counted} (without dense layers) differs "
              f"from pruned_layout.experts_per_layer {list(after.values())}; the config was edited: it will not load "
              "as written.", file=sys.stderr)
        return 1
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
