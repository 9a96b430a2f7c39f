"""Bad input is refused before any expensive work, with a message naming the value and the fix."""

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from factories import random_token_batches, tiny_model
from optimum_grape import (BudgetError, CalibrationDataError, CheckpointError, GrapeConfig, GrapePruner,
                           UnsupportedModelError)


def pruner(**kwargs):
    return GrapePruner(GrapeConfig(num_samples=4, sequence_length=16, **kwargs))


def test_dense_model_names_the_supported_families():
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(UnsupportedModelError, match="mixtral.*olmoe.*qwen3_moe|Supported MoE families"):
        pruner(pruning_ratio=0.25).calibrate(dense, random_token_batches())


def test_budget_below_top_k_is_refused_before_calibration():
    model = tiny_model("mixtral")  # 4 layers x 8 experts, top-2: at most 24 removable
    with pytest.raises(BudgetError, match="at most 24"):
        pruner(num_experts_to_prune=25).calibrate(model, [])  # [] would fail later: budget is checked first


def test_budget_below_user_floor_is_refused():
    model = tiny_model("mixtral")
    with pytest.raises(BudgetError, match="min_experts_per_layer"):
        pruner(pruning_ratio=0.5, min_experts_per_layer=6).calibrate(model, random_token_batches())


def test_empty_calibration_data():
    with pytest.raises(CalibrationDataError, match="empty"):
        pruner(pruning_ratio=0.25).calibrate(tiny_model("mixtral"), [])


def test_strings_without_a_tokenizer():
    with pytest.raises(CalibrationDataError, match="no tokenizer"):
        pruner(pruning_ratio=0.25).calibrate(tiny_model("mixtral"), ["some text"])


def test_missing_dataset_path():
    with pytest.raises(CalibrationDataError, match="neither a text file"):
        pruner(pruning_ratio=0.25, dataset="/nonexistent/calib.txt").calibrate(tiny_model("mixtral"))


def test_non_empty_output_folder_is_refused_unless_overwrite(tmp_path):
    model = tiny_model("mixtral")
    p = pruner(pruning_ratio=0.25)
    p.prune(model, random_token_batches())
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="overwrite=True"):
        p.save_pretrained(model, tmp_path / "out")
    # overwrite replaces only a checkpoint optimum-grape wrote (issue 12): never an unrelated folder
    with pytest.raises(CheckpointError, match="not a checkpoint written by optimum-grape"):
        p.save_pretrained(model, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"
    p.save_pretrained(model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "notes.txt").write_text("replaced with the checkpoint")
    p.save_pretrained(model, tmp_path / "ckpt", overwrite=True)
    assert (tmp_path / "ckpt" / "config.json").exists() and not (tmp_path / "ckpt" / "notes.txt").exists()


def test_interrupted_save_leaves_nothing_at_the_destination(tmp_path, monkeypatch):
    model = tiny_model("mixtral")
    p = pruner(pruning_ratio=0.25)
    p.prune(model, random_token_batches())

    def half_write(folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "save_pretrained", half_write)
    with pytest.raises(KeyboardInterrupt):
        p.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # no staging folder left behind either


def test_interrupted_overwrite_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    model = tiny_model("mixtral")
    p = pruner(pruning_ratio=0.25)
    p.prune(model, random_token_batches())
    p.save_pretrained(model, tmp_path / "out")
    old = (tmp_path / "out" / "model.safetensors").read_bytes()
    monkeypatch.setattr(model, "save_pretrained", lambda folder, **kw: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        p.save_pretrained(model, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == old


def test_plan_for_another_model_is_refused():
    from optimum_grape import GrapeError

    model = tiny_model("mixtral")
    p = pruner(pruning_ratio=0.25)
    plan = p.plan(p.calibrate(model, random_token_batches()))
    other = tiny_model("mixtral", experts=6)
    with pytest.raises(GrapeError, match="planned on"):
        p.apply(other, plan)


def test_incompatible_allocation_is_a_clear_error():
    from optimum_grape import GrapeConfigError
    from optimum_grape.methods import PruningMethod, register_method, METHODS

    class LocalOnly(PruningMethod):
        name = "_local_only_test"
        allocations = ("uniform",)

    register_method(LocalOnly())
    try:
        with pytest.raises(GrapeConfigError, match="does not apply"):
            GrapeConfig(method="_local_only_test", allocation="global", pruning_ratio=0.25)
    finally:
        METHODS.pop("_local_only_test")


def test_plan_must_partition_the_experts():
    from optimum_grape import GrapeError, PruningPlan

    with pytest.raises(GrapeError, match="partition experts 0..3 exactly once"):
        PruningPlan(clusters={0: [[0, 1], [1, 2], [3]]}, num_experts_before={0: 4})
    with pytest.raises(GrapeError, match="merge_weights do not match"):
        PruningPlan(clusters={0: [[0, 1], [2], [3]]}, num_experts_before={0: 4}, merge_weights={0: [[1.0]] * 3})


def test_plan_naming_a_dense_layer_is_refused():
    from optimum_grape import GrapeError, PruningPlan

    model = tiny_model("mixtral")
    plan = PruningPlan(clusters={9: [[0, 1]] + [[e] for e in range(2, 8)]}, num_experts_before={9: 8})
    with pytest.raises(GrapeError, match="not an MoE layer"):
        pruner(pruning_ratio=0.25).apply(model, plan)


def test_align_neurons_must_be_a_bool():
    from optimum_grape import GrapeConfigError

    with pytest.raises(GrapeConfigError, match="align_neurons"):
        GrapeConfig(pruning_ratio=0.25, align_neurons="yes")
