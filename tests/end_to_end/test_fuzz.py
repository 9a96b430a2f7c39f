"""Seeded fuzzing (issue 12): random mutations of a valid plan and of a valid statistics file are
either refused with a GrapeError (CLI: exit 2) leaving the model untouched, or give a model whose
saved checkpoint loads back with finite weights and logits. Never anything else.

One model, one calibration; mutations happen in memory. Most cases call the library (what the CLI
calls), some call the CLI's `main` in this process, two run the CLI as a subprocess.
"""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from transformers import AutoModelForCausalLM

from helpers import PROBE, run_cli
from optimum_grape import ExpertStats, GrapeConfig, GrapeError, GrapePruner, PruningPlan
from optimum_grape.cli import main as cli_main
from optimum_grape.methods import METHODS, NEEDS

SEED = 12
PLAN_CASES = 160
STATS_CASES = 160
IN_PROCESS_CLI_CASES = 16  # of each kind, taken from the cases above
JUNK = [None, True, False, 0, 1, 2, -1, 7, 8, 9, 0.5, -0.5, 1.5, 1e308, -1e308, math.nan, math.inf, -math.inf, "x",
        "0", "", [], {}, [[]], [[0]], [1.0], {"0": 1}]


@pytest.fixture(scope="module")
def setup(base_folder):
    model = AutoModelForCausalLM.from_pretrained(base_folder).eval()
    pruners = {m: GrapePruner(GrapeConfig(method=m, pruning_ratio=0.25, num_samples=8, sequence_length=32,
                                          selection_samples=0)) for m in sorted(METHODS)}
    pruner = pruners["grape"]
    gen = torch.Generator().manual_seed(0)
    stats = pruner.calibrate(model, [torch.randint(0, 96, (32,), generator=gen) for _ in range(8)], extra_needs=NEEDS)
    plan = pruner.plan(stats)
    path = base_folder.parent / "fuzz-stats.safetensors"
    stats.save(path)
    tensors = load_safetensors(path.read_bytes())
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        header = json.loads(handle.metadata()["grape_stats"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return {"model": model, "pruner": pruner, "pruners": pruners, "plan": plan.to_dict(), "header": header,
            "tensors": tensors, "state": state}


# -- mutations ---------------------------------------------------------------------------------------
def _containers(node, path=()):
    """Every (container, key) in a JSON tree, as paths."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield path + (key,)
        yield from _containers(value, path + (key,))


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def mutate_json(tree: dict, rng: random.Random) -> dict:
    """1-3 random edits: replace a value by junk, delete it, duplicate or drop a list item, nudge a
    number, or move an expert / merge two clusters / split one (the edits a hand would make)."""
    tree = copy.deepcopy(tree)
    for _ in range(rng.randint(1, 3)):
        if not tree:
            break
        # each field as likely as any other however large, then the field itself or something in it
        top = (rng.choice(sorted(tree)),)
        if top == ("metadata",) and isinstance(tree["metadata"], dict) and tree["metadata"] and rng.random() < 0.8:
            top += (rng.choice(sorted(tree["metadata"])),)  # free-form, but the card and CLI read some entries
        path = top if rng.random() < 0.5 else rng.choice([top, *_containers(_at(tree, top), top)])
        parent, key = _at(tree, path[:-1]), path[-1]
        op = rng.random()
        if op < 0.3:
            parent[key] = copy.deepcopy(rng.choice(JUNK))
        elif op < 0.4:
            del parent[key]
        elif op < 0.5 and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(parent[key]))
        elif op < 0.6 and isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
            parent[key] = parent[key] * rng.choice([0, -1, 2, 1 + 1e-9, 1e6]) + rng.choice([0, 1e-7, 1e-3, 1])
        elif "clusters" in tree and isinstance(tree["clusters"], dict) and tree["clusters"]:
            _regroup(tree, rng)
    return tree


def _regroup(plan: dict, rng: random.Random) -> None:
    """Merge two clusters of a layer or split one, keeping weights consistent (renormalised)."""
    layer = rng.choice(list(plan["clusters"]))
    clusters = plan["clusters"][layer]
    weights = {n: plan[n].get(layer) if isinstance(plan.get(n), dict) else None
               for n in ("merge_weights", "router_weights")}
    if not (isinstance(clusters, list) and all(isinstance(c, list) and c for c in clusters)) or \
            not all(isinstance(w, list) and len(w) == len(clusters) for w in weights.values()):
        return
    if len(clusters) >= 2 and rng.random() < 0.6:
        i, j = sorted(rng.sample(range(len(clusters)), 2))
        clusters[i] = clusters[i] + clusters.pop(j)
        for w in weights.values():
            joined = w[i] + w.pop(j)
            w[i] = [x / sum(joined) for x in joined] if sum(joined) else joined
    else:
        i = rng.randrange(len(clusters))
        if len(clusters[i]) > 1:
            clusters.append([clusters[i].pop()])
            for w in weights.values():
                w[i].pop()
                w[i] = [x / sum(w[i]) for x in w[i]] if sum(w[i]) else w[i]
                w.append([1.0])
    if "experts_per_layer" in plan and isinstance(plan["experts_per_layer"], dict):
        plan["experts_per_layer"][layer] = len(clusters)


def mutate_stats(header: dict, tensors: dict, rng: random.Random) -> bytes:
    header, tensors = copy.deepcopy(header), {k: v.clone() for k, v in tensors.items()}
    if rng.random() < 0.5:
        header = mutate_json(header, rng)
    else:
        key = rng.choice(sorted(tensors))
        t = tensors[key]
        op = rng.randrange(7)
        if op == 0:
            value = rng.choice([math.nan, math.inf, -1.0, 1e300, 0.0, 1e-300])
            if t.is_floating_point() and math.isfinite(value) and abs(value) > torch.finfo(t.dtype).max:
                value = math.inf  # what 1e300 becomes in a narrower float
            elif not t.is_floating_point() and not math.isfinite(value):
                value = -1
            t.view(-1)[rng.randrange(t.numel())] = value
        elif op == 1:
            tensors[key] = t[:-1] if t.shape[0] > 1 else t.flatten()
        elif op == 2:
            tensors[key] = t.unsqueeze(0)
        elif op == 3:
            tensors[key] = t.long()
        elif op == 4:
            del tensors[key]
        elif op == 5:
            tensors[key.replace("layers.", "layers.9")] = tensors.pop(key)
        else:
            tensors[key] = t * rng.choice([0.0, -1.0, 1e300, 2.0])
    return save_safetensors(tensors, metadata={"grape_stats": json.dumps(header)})


# -- the invariant ------------------------------------------------------------------------------------
def check_outcome(setup, make_plan, tmp_path, name: str) -> bool:
    """Refused with a GrapeError and the model untouched, or applied and loadable with finite
    weights and logits. Returns whether it was applied."""
    model = copy.deepcopy(setup["model"])
    try:
        plan = make_plan()
        setup["pruner"].apply(model, plan)
    except GrapeError:
        assert all(torch.equal(v, setup["state"][k]) for k, v in model.state_dict().items())
        assert getattr(model.config, "quantization_config", None) is None
        return False
    setup["pruner"].save_pretrained(model, tmp_path / name)
    assert_loads_finite(tmp_path / name)
    return True


def assert_loads_finite(folder) -> None:
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert all(bool(torch.isfinite(p).all()) for p in reloaded.parameters())
    with torch.no_grad():
        assert bool(torch.isfinite(reloaded(PROBE).logits).all())


def plan_cases(setup):
    rng = random.Random(SEED)
    return [mutate_json(setup["plan"], rng) for _ in range(PLAN_CASES)]


def stats_cases(setup):
    rng = random.Random(SEED + 1)
    return [mutate_stats(setup["header"], setup["tensors"], rng) for _ in range(STATS_CASES)]


def test_mutated_plans(setup, tmp_path):
    applied = [check_outcome(setup, lambda: PruningPlan.from_dict(case), tmp_path, f"p{i}")
               for i, case in enumerate(plan_cases(setup))]
    assert 0.1 * PLAN_CASES < sum(applied) < 0.9 * PLAN_CASES  # the fuzzer reaches both outcomes


def test_mutated_stats(setup, tmp_path):
    """Each case planned by another method in turn: every planning algorithm meets tampered statistics."""
    methods = sorted(setup["pruners"])

    def planned(data: bytes, method: str):
        (tmp_path / "stats.safetensors").write_bytes(data)
        return setup["pruners"][method].plan(ExpertStats.load(tmp_path / "stats.safetensors"))

    applied = [check_outcome(setup, lambda: planned(case, methods[i % len(methods)]), tmp_path, f"s{i}")
               for i, case in enumerate(stats_cases(setup))]
    assert 0.1 * STATS_CASES < sum(applied) < 0.9 * STATS_CASES


def _cli(base_folder, tmp_path, flag: str, data, name: str) -> int:
    source = tmp_path / f"{name}.in"
    source.write_bytes(data) if isinstance(data, bytes) else source.write_text(json.dumps(data))
    code = cli_main(["prune", str(base_folder), "--output", str(tmp_path / name), flag, str(source)])
    assert code in (0, 2)
    assert (code == 0) == (tmp_path / name).exists()
    if code == 0:
        assert_loads_finite(tmp_path / name)
    return code


def test_mutated_inputs_through_the_cli(setup, base_folder, tmp_path):
    """The CLI's main, in this process: exit 0 with a loadable finite checkpoint, or exit 2 and no output."""
    codes = [_cli(base_folder, tmp_path, "--plan", case, f"p{i}")
             for i, case in enumerate(plan_cases(setup)[:IN_PROCESS_CLI_CASES])]
    codes += [_cli(base_folder, tmp_path, "--stats", case, f"s{i}")
              for i, case in enumerate(stats_cases(setup)[:IN_PROCESS_CLI_CASES])]
    assert 0 in codes and 2 in codes


def test_mutated_inputs_through_a_cli_subprocess(setup, base_folder, tmp_path):
    """Two cases as a user runs them, one refused and one applied: no traceback, the right exit code."""
    plans = plan_cases(setup)
    refused = next(p for p in plans if not _applies(setup, p))
    applied = next(p for p in plans if _applies(setup, p))
    for case, expected in ((refused, 2), (applied, 0)):
        (tmp_path / "plan.json").write_text(json.dumps(case))
        out = tmp_path / f"out{expected}"
        result = run_cli("prune", base_folder, "--output", out, "--plan", tmp_path / "plan.json")
        assert result.returncode == expected, result.stderr[-2000:]
        assert "Traceback" not in result.stderr
        if expected == 0:
            assert_loads_finite(out)
        else:
            assert "optimum-grape: error:" in result.stderr and not out.exists()


def _applies(setup, case) -> bool:
    try:
        setup["pruner"].apply(copy.deepcopy(setup["model"]), PruningPlan.from_dict(case))
    except GrapeError:
        return False
    return True
