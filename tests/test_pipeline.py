"""End to end on tiny models of each core family: calibrate -> plan -> apply -> save -> reload."""

import json

import pytest
import torch

from factories import CORE_FAMILIES, plant_copies, random_token_batches, tiny_model
from helpers import PROBE, logits, logits_in_fresh_process
from optimum_grape import ExpertStats, GrapeConfig, GrapePruner, PruningPlan
from optimum_grape.adapters import find_moe_layers
from optimum_grape.evaluation.perplexity import mean_kl

FAMILY_NAMES = sorted(CORE_FAMILIES)  # every other family: tests/test_families.py


def small_config(**kwargs):
    defaults = dict(num_samples=8, sequence_length=32, batch_size=4, max_tokens_per_layer=128)
    defaults.update(kwargs)
    return GrapeConfig(**defaults)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_prune_save_reload_in_fresh_process(family, tmp_path):
    model = tiny_model(family)
    pruner = GrapePruner(small_config(pruning_ratio=0.25))
    stats = pruner.calibrate(model, random_token_batches())
    plan = pruner.plan(stats)
    assert plan.num_removed == 8
    pruner.apply(model, plan)
    # every count the forward reads agrees with the tensors
    adapter, layers = find_moe_layers(model)
    for layer in layers:
        n = plan.experts_per_layer[layer.index]
        assert layer.experts.num_experts == n and layer.router.num_experts == n
        assert layer.experts.gate_up_proj.shape[0] == n and layer.router.weight.shape[0] == n
    expected = logits(model)
    model.generate(PROBE[:1, :4], max_new_tokens=3, do_sample=False)
    out = pruner.save_pretrained(model, tmp_path / "pruned")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "grape"
    assert [c for c in config["num_local_experts_per_layer"]] == [plan.experts_per_layer[i] for i in range(4)]
    assert PruningPlan.from_json((out / "grape_plan.json").read_text()).clusters == plan.clusters
    card = (out / "README.md").read_text()
    assert "base_model" in card or "library_name: transformers" in card
    assert "experts before" in card and "import optimum_grape" in card
    assert torch.allclose(logits_in_fresh_process(out), expected, atol=1e-5)


def test_uniform_counts_reload_without_the_plugin(tmp_path):
    model = tiny_model("mixtral")
    pruner = GrapePruner(small_config(pruning_ratio=0.25, allocation="uniform"))
    pruner.prune(model, random_token_batches())
    assert set(pruner.last_plan.experts_per_layer.values()) == {6}
    expected = logits(model)
    out = pruner.save_pretrained(model, tmp_path / "uniform")
    assert json.loads((out / "config.json").read_text())["num_local_experts"] == 6
    assert torch.allclose(logits_in_fresh_process(out, use_plugin=False), expected, atol=1e-5)


def test_model_save_pretrained_alone_writes_a_loadable_checkpoint(tmp_path):
    model = tiny_model("olmoe")
    GrapePruner(small_config(num_experts_to_prune=5)).prune(model, random_token_batches())
    expected = logits(model)
    model.save_pretrained(tmp_path / "plain")
    assert torch.allclose(logits_in_fresh_process(tmp_path / "plain"), expected, atol=1e-5)


def test_stats_save_load_and_replan_is_identical(tmp_path):
    model = tiny_model("mixtral")
    pruner = GrapePruner(small_config(pruning_ratio=0.25))
    stats = pruner.calibrate(model, random_token_batches())
    stats.save(tmp_path / "stats.safetensors")
    loaded = ExpertStats.load(tmp_path / "stats.safetensors")
    assert loaded.metadata == stats.metadata
    assert torch.equal(loaded.layers[1].similarity, stats.layers[1].similarity)
    assert pruner.plan(loaded).to_json() == pruner.plan(stats).to_json()
    assert PruningPlan.from_json(pruner.plan(stats).to_json()).to_json() == pruner.plan(stats).to_json()


def test_calibration_leaves_the_model_unchanged():
    model = tiny_model("qwen3_moe")
    before = logits(model)
    implementation = model.config._experts_implementation
    GrapePruner(small_config(pruning_ratio=0.25)).calibrate(model, random_token_batches())
    assert model.config._experts_implementation == implementation
    assert torch.equal(logits(model), before)


def test_calibration_records_routing_consistently():
    model = tiny_model("mixtral")
    batches = random_token_batches(n=8, length=32)
    stats = GrapePruner(small_config(pruning_ratio=0.25)).calibrate(model, batches)
    for layer in stats.layers.values():
        assert float(layer.tokens.sum()) == 8 * 32 * 2  # every token routed to top_k = 2 experts
        assert float(layer.weight_mass.sum()) == pytest.approx(8 * 32, rel=1e-5)  # renormalised top-k
        assert layer.similarity.shape == (8, 8) and (layer.saliency >= 0).all()


def test_text_calibration_with_a_real_tokenizer(tokenizer):
    model = tiny_model("mixtral")
    texts = ["The Congress shall have power to lay and collect taxes.", "In the beginning was the Word.",
             "Return a new sorted list from the items in iterable."] * 10
    stats = GrapePruner(small_config(pruning_ratio=0.25)).calibrate(model, texts, tokenizer=tokenizer)
    assert stats.metadata["num_tokens"] > 0


def planted_model():
    model = tiny_model("mixtral", layers=4, experts=8, seed=3)
    plant_copies(model, layer=2, copies=[0, 1, 2, 3, 4, 5])
    return model


def test_grape_merges_only_planted_copies_in_their_layer():
    model = planted_model()
    pruner = GrapePruner(small_config(num_experts_to_prune=3, preset="paper"))
    plan = pruner.plan(pruner.calibrate(model, random_token_batches(n=16)))
    for layer, clusters in plan.clusters.items():
        merged = [c for c in clusters if len(c) > 1]
        if layer == 2:
            assert all(set(c) <= set(range(6)) for c in merged) and plan.experts_per_layer[2] == 5
        else:
            assert merged == []


def test_global_budget_beats_uniform_on_planted_redundancy():
    held_out = torch.stack(random_token_batches(n=8, length=32, seed=7))
    reference = planted_model()
    with torch.no_grad():
        ref_logits = reference(held_out).logits
    deviation = {}
    for allocation in ("global", "uniform"):
        model = planted_model()
        GrapePruner(small_config(num_experts_to_prune=4, allocation=allocation)).prune(
            model, random_token_batches(n=16))
        with torch.no_grad():
            deviation[allocation] = mean_kl(ref_logits, model(held_out).logits)
    assert deviation["global"] * 3 < deviation["uniform"], deviation


def test_prune_on_load_through_quantization_config(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from optimum_grape.modeling import GrapeModelForCausalLM

    base = tmp_path / "base"
    tiny_model("mixtral").save_pretrained(base)
    tokenizer.save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=small_config(pruning_ratio=0.25))
    assert sum(l.num_experts for l in find_moe_layers(model)[1]) == 24
    wrapped = GrapeModelForCausalLM.from_pretrained(base, pruning_config=small_config(pruning_ratio=0.25))
    assert sum(l.num_experts for l in find_moe_layers(wrapped)[1]) == 24
    assert torch.allclose(logits(model), logits(wrapped), atol=1e-5)
    model.save_pretrained(tmp_path / "onload")
    assert torch.allclose(logits_in_fresh_process(tmp_path / "onload"), logits(model), atol=1e-5)


def test_push_uploads_weights_first_then_the_card(tmp_path):
    """No network in tests: a stand-in for HfApi records what would be uploaded, in order."""
    from optimum_grape.checkpoint.save import push_pruned

    class RecordingApi:
        def __init__(self):
            self.calls = []

        def create_repo(self, repo_id, private=None, exist_ok=False):
            self.calls.append(("create_repo", repo_id))

        def upload_folder(self, repo_id, folder_path, commit_message, ignore_patterns=()):
            from fnmatch import fnmatch
            from pathlib import Path
            names = [p.name for p in Path(folder_path).iterdir()]
            self.calls.append(("upload_folder", sorted(n for n in names if not any(fnmatch(n, g) for g in ignore_patterns))))

        def upload_file(self, path_or_fileobj, path_in_repo, repo_id, commit_message):
            self.calls.append(("upload_file", path_in_repo, path_or_fileobj.decode()[:3]))

    model = tiny_model("mixtral")
    pruner = GrapePruner(small_config(pruning_ratio=0.25))
    pruner.prune(model, random_token_batches())
    api = RecordingApi()
    push_pruned(model, "me/tiny-grape", plan=pruner.last_plan, api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder", "upload_file"]
    assert "README.md" not in api.calls[1][1] and "model.safetensors" in api.calls[1][1]
    assert "grape_plan.json" in api.calls[1][1]
    assert api.calls[2][1:] == ("README.md", "---")


def test_calibration_from_a_datasets_object_and_a_saved_folder(tmp_path, tokenizer):
    import datasets

    texts = ["Fellow-Citizens of the Senate and House of Representatives.", "In the beginning God created.",
             "The sorted() function returns a new list."] * 8
    ds = datasets.Dataset.from_dict({"text": texts})
    model = tiny_model("mixtral")
    direct = GrapePruner(small_config(pruning_ratio=0.25)).calibrate(model, ds, tokenizer=tokenizer)
    ds.save_to_disk(str(tmp_path / "calib"))
    from_folder = GrapePruner(small_config(pruning_ratio=0.25, dataset=str(tmp_path / "calib"))).calibrate(
        model, None, tokenizer=tokenizer)
    assert direct.metadata["num_tokens"] == from_folder.metadata["num_tokens"] > 0
    assert torch.equal(direct.layers[0].tokens, from_folder.layers[0].tokens)
    (tmp_path / "calib.txt").write_text("\n\n".join(texts))
    from_file = GrapePruner(small_config(pruning_ratio=0.25, dataset=str(tmp_path / "calib.txt"))).calibrate(
        model, None, tokenizer=tokenizer)
    assert from_file.metadata["num_tokens"] == direct.metadata["num_tokens"]


def test_dataset_without_a_text_column_is_refused(tokenizer):
    import datasets

    from optimum_grape import CalibrationDataError

    ds = datasets.Dataset.from_dict({"content": ["a", "b"]})
    with pytest.raises(CalibrationDataError, match="needs a 'text' column"):
        GrapePruner(small_config(pruning_ratio=0.25)).calibrate(tiny_model("mixtral"), ds, tokenizer=tokenizer)


def test_loaded_pruned_model_casts_and_trains_like_any_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("mixtral")
    pruner = GrapePruner(small_config(pruning_ratio=0.25))
    pruner.prune(model, random_token_batches())
    pruner.save_pretrained(model, tmp_path / "p")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    assert torch.allclose(logits(loaded.eval()), logits(model), atol=1e-5)
    loaded.half().float()  # refused by transformers for quantized models; a pruned one is not quantized
    loaded.train()
    out = loaded(PROBE, labels=PROBE)
    out.loss.backward()
    assert loaded.model.layers[0].mlp.experts.gate_up_proj.grad is not None


def test_non_uniform_checkpoint_without_the_plugin_fails_loudly(tmp_path):
    """What the README and model card promise: no silent mis-load without `import optimum_grape`."""
    model = tiny_model("mixtral")
    pruner = GrapePruner(small_config(pruning_ratio=0.25))
    pruner.prune(model, random_token_batches())
    assert len(set(pruner.last_plan.experts_per_layer.values())) > 1
    out = pruner.save_pretrained(model, tmp_path / "nonuniform")
    with pytest.raises(AssertionError, match="ignore_mismatched_sizes"):
        logits_in_fresh_process(out, use_plugin=False)
