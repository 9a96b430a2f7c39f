"""The testbeds the benchmarks run on: where each lives, how it is built, and what it is good for.

    from testbeds.registry import TESTBEDS, load_testbed
    model, tokenizer = load_testbed("qwen2moe-16e")

Only `default` ships with the package; the others are built by `python benchmarks/testbeds/build.py
NAME` into `benchmarks/testbeds/cache/NAME/` (gitignored) and loaded from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1]
CACHE = BENCHMARKS / "testbeds" / "cache"


@dataclass(frozen=True)
class Testbed:
    name: str
    path: Path
    build_command: str
    description: str
    shipped: bool = False


def _default_path() -> Path:
    from optimum_grape.cli import default_model_path

    return default_model_path()


TESTBEDS = {
    "default": Testbed(
        "default", _default_path(),
        "python benchmarks/train_moe.py --testbed default --steps 2000 --batch-size 16 --lr 2e-3 --warmup 100 "
        "--balance-coef 0.05 --seed 0 --threads 1",
        "The model shipped in the package: Mixtral architecture, 6 layers x 8 experts, top-2, 5.5M parameters, "
        "trained from scratch with a per-layer balance loss. Fast; every method runs in minutes.",
        shipped=True),
    "qwen2moe-16e": Testbed(
        "qwen2moe-16e", CACHE / "qwen2moe-16e",
        "python benchmarks/train_moe.py --testbed qwen2moe-16e --steps 3000 --batch-size 16 --lr 2e-3 --warmup 100 "
        "--balance-coef 0.05 --seed 0 --threads 1 --ckpt-every 200",
        "Fine-grained like DeepSeek-MoE and Qwen-MoE: Qwen2-MoE architecture, 8 layers x 16 routed experts, "
        "top-4, one shared expert, trained from scratch with a per-layer balance loss."),
    "smollm2-moe": Testbed(
        "smollm2-moe", CACHE / "smollm2-moe",
        "python benchmarks/testbeds/build.py smollm2-moe --threads 2 --steps 600 --max-train-minutes 120",
        "A real pretrained LM turned into an MoE: SmolLM2-135M's FFNs split into experts, a router fitted per "
        "layer, healed by continued training (benchmarks/testbeds/smollm2_moe.py)."),
}


def testbed(name: str) -> Testbed:
    if name not in TESTBEDS:
        raise SystemExit(f"unknown testbed {name!r}; choose one of {sorted(TESTBEDS)}")
    return TESTBEDS[name]


def load_testbed(name: str):
    """(model in eval mode, tokenizer) of a built testbed; says how to build it if it is missing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bed = testbed(name)
    if not (bed.path / "config.json").exists():
        raise SystemExit(f"testbed {name!r} is not built at {bed.path}; build it with: {bed.build_command}")
    return AutoModelForCausalLM.from_pretrained(bed.path).eval(), AutoTokenizer.from_pretrained(bed.path)
