"""Compare pruning methods on your own model under one budget: ONE calibration records what every
method needs, each method plans from it, each plan is applied to a fresh copy of the model, and
all are scored on the same held-out text with the package's `evaluate` modules.

    python examples/compare_methods.py --model path/to/model --heldout my_text.txt --ratio 0.25
"""

import argparse
import copy
from pathlib import Path

import evaluate
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_grape import GrapeConfig, GrapePruner
from optimum_grape.checkpoint.load import heldout_paths, resolve_base
from optimum_grape.methods import NEEDS
from optimum_grape.metrics import module_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="model folder or cached Hub id ('default': shipped model)")
    parser.add_argument("--methods", default="grape,cprune,frequency,reap,random")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--heldout", default=None, help="held-out .txt file (default: the shipped held-out text)")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    args = parser.parse_args(argv)

    path = resolve_base(args.model)
    base = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = [Path(args.heldout).read_text(encoding="utf-8")] if args.heldout else \
        [p.read_text(encoding="utf-8") for p in heldout_paths()]
    perplexity = evaluate.load(module_path("grape_perplexity"), keep_in_memory=True)
    comparison = evaluate.load(module_path("grape_comparison"), keep_in_memory=True)

    def score(model):
        return perplexity.compute(predictions=texts, model=model, tokenizer=tokenizer, max_tokens=args.eval_tokens)

    reference = score(base)
    calibrator = GrapePruner(GrapeConfig(pruning_ratio=args.ratio, num_samples=args.num_samples))
    stats = calibrator.calibrate(base, None, tokenizer, extra_needs=NEEDS)
    print(f"{'method':10s} {'experts per layer':28s} {'perplexity':>10s} {'worst ratio':>11s}")
    print(f"{'none':10s} {'':28s} {reference['perplexity']:10.2f}")
    for method in args.methods.split(","):
        pruner = GrapePruner(GrapeConfig(method=method, pruning_ratio=args.ratio, num_samples=args.num_samples))
        pruner.selection_batches = calibrator.selection_batches  # held-aside text to score GRAPE's candidates
        model = copy.deepcopy(base)
        plan = pruner.plan(stats, model)
        pruner.apply(model, plan)
        result = score(model)
        worst = comparison.compute(predictions=result["perplexities"], references=reference["perplexities"])
        print(f"{method:10s} {str(list(plan.experts_per_layer.values())):28s} {result['perplexity']:10.2f} "
              f"{worst['max_ratio']:11.3f}")


if __name__ == "__main__":
    main()
