"""Issue 12, item by item: bad input in, a clear error out (exit status 2, or a warning), and
nothing written or deleted that should not be. The CLI runs in this process (`cli.main`, what
`python -m optimum_grape` calls); `test_fuzz.py` runs it as a subprocess too."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from factories import random_token_batches, tiny_model
from helpers import logits
from optimum_grape import (CalibrationDataError, CheckpointError, ExpertStats, GrapeConfig, GrapeConfigError,
                           GrapePruner, PruningPlan)
from optimum_grape.adapters import find_moe_layers
from optimum_grape.cli import main
from optimum_grape.errors import PlanError, StatsError


def prune(capsys, *args) -> tuple[int, str]:
    code = main(["prune", *map(str, args)])
    return code, capsys.readouterr().err


def files(folder) -> dict:
    """Every file under `folder` with its bytes: what must not change."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def ws(tmp_path, base_folder):
    """A private copy of the base model at tmp_path/ws/base, for tests that watch it for damage."""
    base = tmp_path / "ws" / "base"
    shutil.copytree(base_folder, base)
    return base


@pytest.fixture(scope="module")
def planned(base_folder, tmp_path_factory):
    """A valid plan (as JSON data) and statistics file for the model in `base_folder`."""
    model = AutoModelForCausalLM.from_pretrained(base_folder)
    pruner = GrapePruner(GrapeConfig(pruning_ratio=0.25, num_samples=8, sequence_length=32, selection_samples=0))
    stats = pruner.calibrate(model, random_token_batches())
    path = tmp_path_factory.mktemp("planned") / "stats.safetensors"
    stats.save(path)
    return {"plan": pruner.plan(stats).to_dict(), "stats": path}


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def edited_stats(source, tmp_path, edit_header=None, edit_tensors=None):
    """A copy of a statistics file with its header (dict) and/or tensors (dict) edited in place."""
    tensors = load_file(str(source))
    with safe_open(str(source), framework="pt") as handle:
        header = json.loads(handle.metadata()["grape_stats"])
    if edit_header:
        edit_header(header)
    if edit_tensors:
        edit_tensors(tensors)
    out = tmp_path / "edited.safetensors"
    save_file(tensors, str(out), metadata={"grape_stats": json.dumps(header)})
    return out


# -- 1. --save-stats never loses data, and refuses before calibration ----------------------------------
def test_save_stats_never_replaces_the_input_model(ws, tmp_path, capsys):
    before = files(ws.parent)
    code, err = prune(capsys, ws, "--output", tmp_path / "o", "--save-stats", ws / "model.safetensors")
    assert code == 2 and "which this job reads" in err
    code, err = prune(capsys, ws, "--output", tmp_path / "o", "--save-stats", ws / "model.safetensors", "--overwrite")
    assert code == 2
    assert files(ws.parent) == before and not (tmp_path / "o").exists()


@pytest.mark.parametrize("where, needle", [
    ("missing/s.safetensors", "does not exist; create it first"),
    ("notes.txt", "not an optimum-grape statistics file"),
    (".", "is a folder"),
    ("o/s.safetensors", "inside the output folder"),
    ("stats.safetensors", "pass --overwrite"),
])
def test_save_stats_is_refused_before_the_model_loads(tmp_path, capsys, planned, where, needle):
    (tmp_path / "notes.txt").write_text("mine")
    shutil.copy(planned["stats"], tmp_path / "stats.safetensors")
    before = files(tmp_path)
    # BASE does not exist: the refusal must come before the model is looked for.
    code, err = prune(capsys, "/does/not/exist", "--output", tmp_path / "o", "--save-stats", tmp_path / where)
    assert code == 2 and needle in err, err
    assert files(tmp_path) == before


def test_stats_save_replaces_only_statistics(tmp_path, planned):
    stats = ExpertStats.load(planned["stats"])
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(CheckpointError, match="not an optimum-grape statistics file"):
        stats.save(tmp_path / "model.safetensors")
    assert (tmp_path / "model.safetensors").read_bytes() == b"weights"
    stats.save(tmp_path / "s.safetensors")
    stats.save(tmp_path / "s.safetensors")  # a statistics file is replaced (atomically: no partial file left)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "s.safetensors"]


# -- 2. --overwrite replaces only a checkpoint optimum-grape wrote, never what the job reads ----------
def test_overwrite_never_deletes_the_input_or_unrelated_files(ws, tmp_path, capsys, planned):
    (ws.parent / "unrelated.txt").write_text("keep")
    other = tmp_path / "thesis"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    before, before_other = files(ws.parent), files(other)
    for output, needle in ((ws.parent, "which this job reads"), (ws, "which this job reads"),
                           (other, "not a checkpoint written by optimum-grape")):
        code, err = prune(capsys, ws, "--output", output, "--overwrite")
        assert code == 2 and needle in err, err
    plan = write_json(tmp_path / "plan.json", planned["plan"])
    code, err = prune(capsys, ws, "--output", tmp_path, "--overwrite", "--plan", plan)  # holds the plan it reads
    assert code == 2 and "which this job reads" in err
    assert files(ws.parent) == before and files(other) == before_other


def test_overwrite_replaces_a_checkpoint_but_not_its_added_folders(tmp_path, capsys, base_folder, planned):
    plan = write_json(tmp_path / "plan.json", planned["plan"])
    assert prune(capsys, base_folder, "--output", tmp_path / "out", "--plan", plan)[0] == 0
    (tmp_path / "out" / "eval").mkdir()
    code, err = prune(capsys, base_folder, "--output", tmp_path / "out", "--plan", plan, "--overwrite")
    assert code == 2 and "sub-folders ['eval']" in err
    (tmp_path / "out" / "eval").rmdir()
    assert prune(capsys, base_folder, "--output", tmp_path / "out", "--plan", plan, "--overwrite")[0] == 0


# -- 3. plans and statistics are checked against the router's top-k ----------------------------------
def one_cluster(plan: dict, layer: str = "0") -> dict:
    plan = copy.deepcopy(plan)
    plan.pop("experts_per_layer")
    plan["clusters"][layer] = [list(range(8))]
    plan["merge_weights"][layer] = [[1 / 8] * 8]
    plan["router_weights"][layer] = [[1.0] + [0.0] * 7]
    return plan


def test_plan_below_the_routers_top_k_is_refused(tmp_path, capsys, base_folder, planned):
    plan = write_json(tmp_path / "plan.json", one_cluster(planned["plan"]))
    code, err = prune(capsys, base_folder, "--output", tmp_path / "o", "--plan", plan)
    assert code == 2 and "layer 0 with 1 expert(s)" in err and "top 2" in err
    assert not (tmp_path / "o").exists()


def test_tampered_statistics_cannot_lower_the_floor(tmp_path, capsys, base_folder, planned):
    def floor_one(header):
        header["layers"]["0"]["floor"] = 1

    with pytest.raises(StatsError, match="floor=1 must lie between the router's top_k=2"):
        ExpertStats.load(edited_stats(planned["stats"], tmp_path, floor_one))

    def floor_and_top_k_one(header):  # consistent with itself, not with the model
        header["layers"]["0"]["floor"] = 1
        header["layers"]["0"]["routing"]["top_k"] = 1

    tampered = edited_stats(planned["stats"], tmp_path, floor_and_top_k_one)
    # 25 = 7 from layer 0 (down to 1 expert) + 6 from each other layer: only possible with the lowered floor
    code, err = prune(capsys, base_folder, "--output", tmp_path / "o", "--stats", tampered,
                      "--num-experts-to-prune", "25")
    assert code == 2 and "layer 0 with 1 expert(s)" in err and not (tmp_path / "o").exists()


# -- 4. merge and router weights ---------------------------------------------------------------------
def merged_cluster(plan: dict) -> tuple[str, int]:
    """(layer, index) of the first cluster that merges several experts."""
    return next((layer, i) for layer, clusters in sorted(plan["clusters"].items())
                for i, cluster in enumerate(clusters) if len(cluster) > 1)


def _set(name, value):
    def edit(plan):
        layer, i = merged_cluster(plan)
        plan[name][layer][i] = value(plan[name][layer][i])
    return edit


@pytest.mark.parametrize("edit, needle", [
    (_set("merge_weights", lambda w: [float("nan")] * len(w)), "finite numbers"),
    (_set("merge_weights", lambda w: [0.0] * len(w)), "sum to 1"),
    (_set("merge_weights", lambda w: [-1.0] + [2.0] + [0.0] * (len(w) - 2)), "lie in [0, 1]"),
    (_set("merge_weights", lambda w: [1e30] * len(w)), "lie in [0, 1]"),
    (_set("router_weights", lambda w: [float("inf")] * len(w)), "finite numbers"),
    (_set("router_weights", lambda w: [0.5] * len(w)), "sum to 1"),
    (lambda plan: plan.pop("merge_weights"), "missing ['merge_weights']"),
    (lambda plan: plan["merge_weights"].pop("3"), "no merge_weights for layers [3]"),
])
def test_bad_weights_are_refused(planned, edit, needle):
    plan = copy.deepcopy(planned["plan"])
    edit(plan)
    with pytest.raises(PlanError) as err:
        PruningPlan.from_dict(plan)
    assert needle in str(err.value)


def test_bad_weights_through_the_cli(tmp_path, capsys, base_folder, planned):
    plan = copy.deepcopy(planned["plan"])
    _set("merge_weights", lambda w: [float("nan")] * len(w))(plan)
    code, err = prune(capsys, base_folder, "--output", tmp_path / "o", "--plan", write_json(tmp_path / "p.json", plan))
    assert code == 2 and f"merge_weights[{merged_cluster(plan)[0]}]" in err and not (tmp_path / "o").exists()


def test_edited_metadata_cannot_break_the_checkpoint(tmp_path, planned):
    """metadata is free-form; the entries code reads are recomputed (routing_overrides) or read defensively."""
    plan = copy.deepcopy(planned["plan"])
    plan["metadata"].update(calibration=5, routing_overrides={"0": {"n_group": 1}}, allocation=[None])
    model = tiny_model("mixtral")  # the model saved in base_folder, which the plan was made for
    pruner = GrapePruner(pruning_ratio=0.25)
    pruner.apply(model, PruningPlan.from_dict(plan))
    pruner.save_pretrained(model, tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.isfinite(logits(reloaded)).all()


# -- 5. apply_plan is all or nothing -----------------------------------------------------------------
def _unchanged(model, state, counts) -> bool:
    return (all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
            and [l.experts.num_experts for l in find_moe_layers(model)[1]] == counts
            and getattr(model.config, "quantization_config", None) is None)


def test_a_plan_that_fails_at_its_last_layer_changes_nothing():
    model = tiny_model("mixtral")
    state, counts = {k: v.clone() for k, v in model.state_dict().items()}, [8] * 4
    clusters = {l: [[0, 1], [2, 3]] + [[e] for e in range(4, 8)] for l in range(3)}
    clusters[3] = [[0, 1]] + [[e] for e in range(2, 6)]  # planned for 6 experts: layer 3 has 8
    plan = PruningPlan(clusters=clusters, num_experts_before={0: 8, 1: 8, 2: 8, 3: 6})
    with pytest.raises(PlanError, match="Layer 3 has 8 experts but the plan was made for 6"):
        GrapePruner(pruning_ratio=0.25).apply(model, plan)
    assert _unchanged(model, state, counts)


def test_a_failure_while_changing_layers_puts_every_layer_back(monkeypatch):
    model = tiny_model("mixtral")
    state, counts, before = {k: v.clone() for k, v in model.state_dict().items()}, [8] * 4, logits(model)
    adapter = find_moe_layers(model)[0]
    calls, original = [], adapter.apply_clusters

    def fail_on_third(layer, *args, **kwargs):
        calls.append(layer.index)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return original(layer, *args, **kwargs)

    monkeypatch.setattr(adapter, "apply_clusters", fail_on_third)
    plan = PruningPlan(clusters={l: [[0, 1, 2]] + [[e] for e in range(3, 8)] for l in range(4)},
                       num_experts_before={l: 8 for l in range(4)},
                       merge_weights={l: [[0.5, 0.25, 0.25]] + [[1.0]] * 5 for l in range(4)})
    with pytest.raises(RuntimeError, match="out of memory"):
        GrapePruner(pruning_ratio=0.25).apply(model, plan)
    assert calls == [0, 1, 2] and _unchanged(model, state, counts)
    assert torch.equal(logits(model), before)


# -- 6. clear errors (exit 2), never a traceback, and no network for a local path --------------------
def test_malformed_inputs_are_clear_errors(tmp_path, capsys, base_folder, planned):
    plan = {k: v for k, v in planned["plan"].items() if k != "experts_per_layer"}
    (tmp_path / "binary.txt").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "not_a_dataset").mkdir()
    (tmp_path / "not_a_dataset" / "a.txt").write_text("text")
    (tmp_path / "bad.json").write_text("{not json")
    cases = [
        (["--plan", tmp_path / "bad.json"], "not valid JSON"),
        (["--plan", write_json(tmp_path / "p1.json", {k: v for k, v in plan.items() if k != "clusters"})],
         "missing ['clusters']"),
        (["--plan", write_json(tmp_path / "p2.json", {**plan, "clusters": {"0": "all"}})], "list of lists"),
        (["--plan", write_json(tmp_path / "p3.json", {**plan, "align_neurons": "yes"})], "align_neurons='yes'"),
        (["--plan", write_json(tmp_path / "p4.json", [plan])], "must be a JSON object"),
        (["--method-kwargs", "{max_subsets: 3}"], "--method-kwargs"),
        (["--method-kwargs", "[1, 2]"], "must be a JSON object"),
        (["--dataset", tmp_path / "binary.txt"], "looks binary"),
        (["--dataset", tmp_path / "latin1.txt"], "is not UTF-8 text (byte 0xe9"),
        (["--dataset", tmp_path / "empty.txt"], "holds no text"),
        (["--dataset", tmp_path / "not_a_dataset"], "not a dataset saved with"),
        (["--eval-tokens", "0"], "--eval-tokens 0 must be an integer >= 2"),
        (["--eval-tokens", "-100"], "--eval-tokens -100"),
        (["--stats", tmp_path / "binary.txt"], "Cannot read statistics"),
    ]
    for extra, needle in cases:
        code, err = prune(capsys, base_folder, "--output", tmp_path / "o", *extra)
        assert code == 2 and needle in err, (extra, err)
        assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_a_local_path_that_does_not_exist_never_reaches_the_network(tmp_path, capsys, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    (tmp_path / "weights.bin").write_bytes(b"x")
    for base, needle in (("/does/not/exist", "does not exist"), ("./ws3", "does not exist"),
                         ("~/no-such-model", "does not exist"), ("models/org/name", "does not exist"),
                         (tmp_path, "no config.json"), (tmp_path / "weights.bin", "no config.json")):
        code, err = prune(capsys, base, "--output", tmp_path / "o")
        assert code == 2 and needle in err, (base, err)


def test_a_hub_id_with_hf_hub_offline_is_looked_up_in_the_cache_only(tmp_path, capsys, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    code, err = prune(capsys, "no-such-org/no-such-model", "--output", tmp_path / "o")
    assert code == 2 and "HF_HUB_OFFLINE is set" in err


def _drop(key):
    return lambda tensors: tensors.pop(key)


def _put(key, value):
    def edit(tensors):
        tensors[key] = value(tensors[key]).contiguous()
    return edit


@pytest.mark.parametrize("header, tensors, needle", [
    (lambda h: h.pop("layers"), None, "expected ['layers', 'metadata']"),
    (lambda h: h["layers"].update({"x": h["layers"]["0"]}), None, "key 'x' is not a decoder-layer index"),
    (lambda h: h["layers"]["0"].update(num_experts=9), None, "router_weight has shape (8, 32), expected [9, 32]"),
    (lambda h: h["layers"]["0"].update(num_experts="8"), None, "num_experts='8' must be an integer"),
    (lambda h: h["layers"]["0"].pop("routing"), None, "lacks ['routing']"),
    (lambda h: h["layers"]["0"]["routing"].update(scoring="relu"), None, "routing.scoring='relu'"),
    (lambda h: h["layers"]["0"].update(floor=99), None, "floor=99"),
    (None, _drop("layers.1.tokens"), "layer 1 tokens is missing"),
    (None, _put("layers.1.tokens", lambda t: t[:-1]), "tokens has shape (7,), expected [8]"),
    (None, _put("layers.1.router_weight", lambda t: t[:-1]), "router_weight has shape (7, 32), expected [8, 32]"),
    (None, _put("layers.1.similarity", lambda t: t.fill_(float("nan"))), "NaN"),
    (None, _put("layers.1.tokens", lambda t: -t), "negative"),
    (None, _put("layers.1.saliency", lambda t: t.long()), "dtype torch.int64"),
    (None, lambda t: t.update({"layers.0.secret": torch.zeros(8)}), "'layers.0.secret'"),
])
def test_tampered_statistics_files_are_refused(tmp_path, planned, header, tensors, needle):
    with pytest.raises(StatsError) as err:
        ExpertStats.load(edited_stats(planned["stats"], tmp_path, header, tensors))
    assert needle in str(err.value)


def test_files_that_are_not_statistics_are_refused(tmp_path, base_folder):
    (tmp_path / "garbage").write_bytes(b"garbage")
    (tmp_path / "bad_header.safetensors").write_bytes(b"")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "bad_header.safetensors"), metadata={"grape_stats": "{oops"})
    for path, needle in ((tmp_path / "garbage", "Cannot read statistics"),
                         (base_folder / "model.safetensors", "without a 'grape_stats' header"),
                         (tmp_path / "bad_header.safetensors", "not valid JSON")):
        with pytest.raises(StatsError) as err:
            ExpertStats.load(path)
        assert needle in str(err.value)


# -- 7. weak validation ------------------------------------------------------------------------------
def test_a_tiny_calibration_warns(caplog):
    pruner = GrapePruner(GrapeConfig(pruning_ratio=0.25, selection_samples=0))
    with caplog.at_level(logging.WARNING, logger="optimum_grape"):
        pruner.calibrate(tiny_model("mixtral"), [torch.arange(4)])
    assert "Calibration has only 4 tokens" in caplog.text


@pytest.mark.parametrize("kwargs, needle", [
    ({"seed": "1"}, "seed='1' must be an integer"),
    ({"seed": 1.5}, "seed=1.5"),
    ({"seed": True}, "seed=True"),
    ({"entropy_tolerance": "0.1"}, "entropy_tolerance='0.1'"),
    ({"method_kwargs": {"gamas": [0.1]}}, "['gamas'] are not read by method 'grape'; its keys: {'gammas'"),
    ({"method": "cprune", "method_kwargs": {"alpah": 2.0}}, "its keys: {'alpha'"),
    ({"method": "cprune", "method_kwargs": {"alpha": "big"}}, "method_kwargs['alpha']='big' must be a number"),
    ({"method": "enumerate", "method_kwargs": {"max_subsets": 0}}, "must be an integer in [1, inf]"),
    ({"method": "frequency", "method_kwargs": {"gammas": [0.1]}}, "its keys: none"),
    ({"dataset": 123}, "GrapeConfig.dataset=123 (int) is not calibration data"),
])
def test_config_types_are_checked(kwargs, needle):
    with pytest.raises((GrapeConfigError, CalibrationDataError)) as err:
        GrapeConfig(pruning_ratio=0.25, **kwargs)
    assert needle in str(err.value)


def test_non_data_passed_to_calibrate_is_named():
    with pytest.raises(CalibrationDataError, match=r"Calibration data=123 \(int\) is not calibration data"):
        GrapePruner(pruning_ratio=0.25).calibrate(tiny_model("mixtral"), 123)


# -- 8. housekeeping: stale staging folders, permissions ---------------------------------------------
def pruned_model():
    """A tiny Mixtral with two experts of every layer merged (no calibration), and its pruner."""
    model, pruner = tiny_model("mixtral"), GrapePruner(pruning_ratio=0.25)
    plan = PruningPlan(clusters={l: [[0, 1]] + [[e] for e in range(2, 8)] for l in range(4)},
                       num_experts_before={l: 8 for l in range(4)})
    pruner.apply(model, plan)
    return model, pruner


def test_staging_left_by_a_dead_process_is_cleaned_and_nothing_else(tmp_path, caplog):
    from optimum_grape.checkpoint.staging import _host

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = _host()
    stale_partial = tmp_path / f".out.partial-{dead.pid}-{host}-0123abcd"
    stale_old = tmp_path / f".out.old-{dead.pid}-{host}"
    kept = [tmp_path / f".out.partial-{os.getppid()}-{host}-0123abcd",  # owner alive
            tmp_path / f".out.partial-{dead.pid}-ffffffff-0123abcd",  # another host: cannot tell
            tmp_path / ".out.partial-k2j3h4_x",  # an older version's name: owner unknown
            tmp_path / f".other.partial-{dead.pid}-{host}-0123abcd",  # another output's
            tmp_path / f".out.partial-{dead.pid}-{host}-0123abcd.tex"]  # not a name we make
    for folder in [stale_partial, stale_old, *kept]:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x")
    model, pruner = pruned_model()
    with caplog.at_level(logging.WARNING, logger="optimum_grape"):
        pruner.save_pretrained(model, tmp_path / "out")
    # out did not exist: the '.old' folder is the only copy of what was there, so it stays
    assert not stale_partial.exists() and stale_old.exists() and "kept: move it back" in caplog.text
    pruner.save_pretrained(model, tmp_path / "out", overwrite=True)
    assert not stale_old.exists() and all((k / "model.safetensors").exists() for k in kept)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_output_folders_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        pruner, model = pruned_model()[::-1]
        pruner.save_pretrained(model, tmp_path / "out")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask


# -- 9. SHA-256 manifest and inspect --verify --------------------------------------------------------
def test_verify_names_a_damaged_weight_file(tmp_path, capsys):
    model, pruner = pruned_model()
    out = pruner.save_pretrained(model, tmp_path / "out")
    weights = out / "model.safetensors"
    manifest = json.loads((out / "grape_manifest.json").read_text())
    assert manifest["files"]["model.safetensors"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert main(["inspect", "--verify", str(out)]) == 0 and "OK" in capsys.readouterr().out
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # one flipped bit in a tensor: safetensors itself loads this silently
    weights.write_bytes(bytes(data))
    assert main(["inspect", "--verify", str(out)]) == 1
    assert "model.safetensors: SHA-256 mismatch" in capsys.readouterr().err
    (out / "grape_manifest.json").unlink()
    assert main(["inspect", "--verify", str(out)]) == 2 and "no grape_manifest.json" in capsys.readouterr().err


# -- 10. a plan records the model it was made for ----------------------------------------------------
def test_a_plan_for_another_model_is_refused_unless_forced(tmp_path, capsys, base_folder, planned, ws):
    plan = PruningPlan.from_dict(planned["plan"])
    assert plan.model_fingerprint["architecture"] == "MixtralForCausalLM"
    same = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.bfloat16)  # dtype does not matter
    GrapePruner(pruning_ratio=0.25).apply(same, PruningPlan.from_dict(planned["plan"]))
    other = tiny_model("mixtral", seed=1)  # same shapes, other weights
    state = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(PlanError, match="made for a different model.*check_model=False"):
        GrapePruner(pruning_ratio=0.25).apply(other, plan)
    assert _unchanged(other, state, [8] * 4)
    GrapePruner(pruning_ratio=0.25).apply(other, plan, check_model=False)

    tiny_model("mixtral", seed=1).save_pretrained(ws)  # the CLI: BASE is now another model
    path = write_json(tmp_path / "plan.json", planned["plan"])
    code, err = prune(capsys, ws, "--output", tmp_path / "o", "--plan", path)
    assert code == 2 and "--force-plan" in err and not (tmp_path / "o").exists()
    assert prune(capsys, ws, "--output", tmp_path / "o", "--plan", path, "--force-plan")[0] == 0
