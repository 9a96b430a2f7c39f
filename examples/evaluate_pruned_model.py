"""Evaluate a pruned checkpoint against its base: held-out perplexity with the package's
`evaluate` modules (loaded by local path, offline), and optionally zero-shot accuracy with
lm-evaluation-harness (`pip install optimum-grape[eval]`), written into the checkpoint's card.

    python examples/evaluate_pruned_model.py --pruned mixtral-grape-25 --base path/to/Mixtral-8x7B --tasks piqa
"""

import argparse

import evaluate

import optimum_grape  # noqa: F401  (registers the pruned layout with transformers)
from optimum_grape.checkpoint.load import heldout_paths, load_model_and_tokenizer
from optimum_grape.metrics import module_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pruned", required=True, help="folder written by optimum-grape")
    parser.add_argument("--base", default="default", help="the unpruned model ('default': shipped model)")
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--tasks", default=None, help="lm-eval tasks, e.g. piqa,arc_easy (needs the [eval] extra)")
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)

    texts = [p.read_text(encoding="utf-8") for p in heldout_paths()]
    perplexity = evaluate.load(module_path("grape_perplexity"), keep_in_memory=True)
    before = perplexity.compute(predictions=texts, model=args.base, max_tokens=args.eval_tokens)
    after = perplexity.compute(predictions=texts, model=args.pruned, max_tokens=args.eval_tokens)
    comparison = evaluate.load(module_path("grape_comparison"), keep_in_memory=True).compute(
        predictions=after["perplexities"], references=before["perplexities"])
    for path, b, a, r in zip(heldout_paths(), before["perplexities"], after["perplexities"], comparison["ratios"]):
        print(f"{path.stem:12s} perplexity {b:8.2f} -> {a:8.2f} ({r:.3f}x)")
    print(f"worst ratio {comparison['max_ratio']:.3f}, geometric mean {comparison['mean_ratio']:.3f}")

    if args.tasks:
        from pathlib import Path

        from optimum_grape.cli.eval import record_in_card
        from optimum_grape.evaluation.lm_eval import run_lm_eval

        model, tokenizer = load_model_and_tokenizer(args.pruned)
        results = run_lm_eval(model, tokenizer, args.tasks.split(","), limit=args.limit)
        for task, r in results.items():
            print(f"{task:12s} acc {r['acc']:.4f} acc_norm {r['acc_norm']:.4f} ({r['n']} questions)")
        if record_in_card(Path(args.pruned), results, args.limit):
            print(f"accuracies written into {args.pruned}/README.md")


if __name__ == "__main__":
    main()
