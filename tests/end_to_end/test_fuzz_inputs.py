"""Seeded fuzzing of what a user hands the CLI (issue 25): a damaged copy of the base model (weights
truncated or with flipped bytes, config.json edited, a file removed) and random values for the
numeric and path flags of `optimum-grape prune`. Every case either exits 2 with one `optimum-grape:
error:` line (no traceback) and writes nothing, or exits 0 with a checkpoint that loads back with
finite logits. Never anything else: an exception escaping `main` fails the test with its case.

FUZZ_CASES (environment) sets the number of cases of each kind; the default keeps the suite short.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import optimum_grape  # noqa: F401 -- registers the 'grape' layout for reloading the outputs
from helpers import PROBE
from optimum_grape.cli import main

SEED = 25
CASES = int(os.environ.get("FUZZ_CASES", "24"))
SMALL = ["--num-samples", "4", "--sequence-length", "16", "--selection-samples", "2", "--batch-size", "4"]
CONFIG_KEYS = ["num_local_experts", "num_experts_per_tok", "hidden_size", "intermediate_size", "num_hidden_layers",
               "vocab_size", "max_position_embeddings", "model_type", "architectures", "torch_dtype",
               "quantization_config", "num_local_experts_per_layer", "rms_norm_eps", "router_jitter_noise"]
JUNK = [None, True, 0, 1, -1, 2, 3, 6, 10, 10**12, 0.5, -0.5, math.inf, "x", "", "mixtral", [], {}, [8, 8],
        {"quant_method": "grape"}, {"quant_method": "grape", "pruned_layout": {"experts_per_layer": [1]}}]


def _weights(folder):
    return folder / "model.safetensors"


def damage(folder, rng: random.Random) -> str:
    """One random damage to the copy in `folder`; returns what was done."""
    kind = rng.choice(["truncate", "flip header", "flip data", "edit config", "drop config key", "remove file",
                       "config not json"])
    weights = _weights(folder)
    if kind == "truncate":
        size = weights.stat().st_size
        cut = rng.randrange(0, size)
        with open(weights, "r+b") as handle:
            handle.truncate(cut)
        return f"truncate weights at {cut} of {size}"
    if kind in ("flip header", "flip data"):
        raw = bytearray(weights.read_bytes())
        header = int.from_bytes(raw[:8], "little") + 8
        low, high = (0, header) if kind == "flip header" else (header, len(raw))
        spots = [rng.randrange(low, high) for _ in range(rng.choice([1, 4, 64]))]
        for spot in spots:
            raw[spot] = rng.randrange(256)
        weights.write_bytes(bytes(raw))
        return f"{kind} at {spots[:4]}"
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if kind == "edit config":
        key, value = rng.choice(CONFIG_KEYS), rng.choice(JUNK)
        config[key] = value
        config_path.write_text(json.dumps(config))
        return f"config {key} = {value!r}"
    if kind == "drop config key":
        key = rng.choice(sorted(config))
        del config[key]
        config_path.write_text(json.dumps(config))
        return f"config without {key}"
    if kind == "config not json":
        config_path.write_text(config_path.read_text()[: rng.randrange(1, 40)])
        return "config.json cut short"
    victim = rng.choice(sorted(p.name for p in folder.iterdir()))
    (folder / victim).unlink()
    return f"removed {victim}"


def flags(rng: random.Random, out) -> tuple[list[str], str]:
    """Random values for the numeric and choice flags of prune."""
    values = ["0", "-1", "1", "2", "0.5", "1.5", "nan", "inf", "-inf", "1e400", "2**70", "99999999999999999999",
              "x", "", "0x10", "1_000", " 3", "auto", "none"]
    flag = rng.choice(["--ratio", "--num-experts", "--num-samples", "--sequence-length", "--batch-size", "--seed",
                       "--entropy-tolerance", "--layer-cap", "--selection-samples", "--eval-tokens",
                       "--max-tokens-per-layer", "--min-experts-per-layer", "--method", "--allocation", "--merge",
                       "--similarity", "--method-kwargs", "--output"])
    value = rng.choice(values + (["{}", "[]", '{"gammas": [2]}', '{"x": 1}'] if flag == "--method-kwargs" else []))
    args = [flag, value] if flag != "--output" else []
    output = value if flag == "--output" else str(out)
    if "--ratio" not in args and "--num-experts" not in args:
        args += ["--ratio", "0.25"]
    return args + ["--output", output], f"{flag} {value!r}"


def check_case(capsys, argv: list[str], out, what: str) -> int:
    code = main(argv)  # any exception other than SystemExit from argparse fails the test here
    err = capsys.readouterr().err
    assert code in (0, 1, 2), (what, code, err[-1500:])
    assert "Traceback" not in err, (what, err[-1500:])
    if code == 0:
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            logits = model(PROBE).logits
        assert torch.isfinite(logits).all(), what
    else:
        assert "optimum-grape: error:" in err, (what, err[-1500:])
    return code


@pytest.mark.parametrize("case", range(CASES))
def test_a_damaged_base_is_refused_cleanly_or_prunes_to_a_loadable_checkpoint(base_folder, tmp_path, capsys, case):
    rng = random.Random(SEED * 1000 + case)
    folder = tmp_path / "base"
    shutil.copytree(base_folder, folder)
    what = damage(folder, rng)
    out = tmp_path / "out"
    code = check_case(capsys, ["prune", str(folder), "--output", str(out), "--ratio", "0.25", *SMALL], out, what)
    if code != 0:
        assert not out.exists(), what


@pytest.mark.parametrize("case", range(CASES))
def test_random_flag_values_are_refused_cleanly_or_prune(base_folder, tmp_path, capsys, monkeypatch, case):
    rng = random.Random(SEED * 2000 + case)
    monkeypatch.chdir(tmp_path)  # a relative --output lands here, never in the repository
    args, what = flags(rng, tmp_path / "out")
    out = tmp_path / args[args.index("--output") + 1]
    try:
        code = check_case(capsys, ["prune", str(base_folder), *SMALL, *args], out, what)
    except SystemExit as exit:  # argparse refuses a value of the wrong type itself: exit 2 and usage
        assert exit.code == 2, what
        assert "error:" in capsys.readouterr().err, what
        code = 2
    assert code in (0, 2), what
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ([out.name] if code == 0 else []), (what, written)
