"""Prune while loading: `pruning_config=` on optimum-grape's wrapper, or `quantization_config=` on
plain transformers (the same GrapeConfig), then save.

    python examples/prune_on_load.py --model path/to/Qwen3-30B-A3B --output qwen3-grape-25
"""

import argparse

import torch
from transformers import AutoModelForCausalLM

from optimum_grape import GrapeConfig, GrapeModelForCausalLM
from optimum_grape.checkpoint.load import resolve_base


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="model folder or cached Hub id ('default': shipped model)")
    parser.add_argument("--output", required=True)
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--num-samples", type=int, default=64)
    args = parser.parse_args(argv)

    path = resolve_base(args.model)
    config = GrapeConfig(pruning_ratio=args.ratio, num_samples=args.num_samples)
    model = GrapeModelForCausalLM.from_pretrained(path, pruning_config=config)
    print(model.grape_pruner.last_plan.summary())
    model.grape_pruner.save_pretrained(model, args.output)  # with the plan and the model card

    # The same, natively: transformers calls optimum-grape's quantizer hook after the weights load.
    native = AutoModelForCausalLM.from_pretrained(path, quantization_config=GrapeConfig(
        pruning_ratio=args.ratio, num_samples=args.num_samples))
    probe = torch.arange(16)[None]
    with torch.no_grad():
        same = torch.allclose(model(probe).logits, native(probe).logits, atol=1e-5)
    print(f"pruning_config= and quantization_config= give the same model: {same}")


if __name__ == "__main__":
    main()
