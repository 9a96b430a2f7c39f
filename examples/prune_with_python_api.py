"""Prune a Mixture-of-Experts model with the Python API, step by step, and save a Hub-ready folder.

    python examples/prune_with_python_api.py --model path/to/Mixtral-8x7B --output mixtral-grape-25 --ratio 0.25

With no --model it prunes the small Mixtral shipped with optimum-grape. Calibration text: --texts
(a .txt file) or the calibration text shipped with the package.
"""

import argparse
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_grape import GrapeConfig, GrapePruner
from optimum_grape.checkpoint.load import resolve_base


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="model folder or cached Hub id ('default': shipped model)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--method", default="grape")
    parser.add_argument("--texts", default=None, help="calibration .txt file (default: shipped calibration text)")
    parser.add_argument("--num-samples", type=int, default=64)
    args = parser.parse_args(argv)

    path = resolve_base(args.model)
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = Path(args.texts).read_text(encoding="utf-8").split("\n\n") if args.texts else None

    pruner = GrapePruner(GrapeConfig(method=args.method, pruning_ratio=args.ratio, num_samples=args.num_samples))
    stats = pruner.calibrate(model, texts, tokenizer)   # 1. measure (the model is unchanged)
    plan = pruner.plan(stats, model)                    # 2. plan: clusters of original expert ids
    print(plan.summary())
    pruner.apply(model, plan)                           # 3. merge in place
    out = pruner.save_pretrained(model, args.output, tokenizer)  # 4. weights, config, plan, card, plot
    print(f"wrote {out}: {sorted(p.name for p in out.iterdir())}")


if __name__ == "__main__":
    main()
