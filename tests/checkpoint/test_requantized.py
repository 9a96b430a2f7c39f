"""A pruned checkpoint quantized afterwards keeps its per-layer expert counts (checkpoint/requantized.py): the
later quantizer replaces `quantization_config`, the top-level `num_local_experts_per_layer` stays,
and the quantized checkpoint reloads with exactly the logits of the quantized model that was saved."""

import json

import pytest
import torch

from factories import random_token_batches, tiny_model
from helpers import logits, logits_in_fresh_process
from optimum_grape import GrapeConfig, GrapePruner
from optimum_grape.adapters import find_moe_layers


@pytest.fixture(scope="module")
def pruned_folder(tmp_path_factory):
    model = tiny_model("mixtral")
    pruner = GrapePruner(GrapeConfig(pruning_ratio=0.25, num_samples=8, sequence_length=32, batch_size=4,
                                     max_tokens_per_layer=128, preset="paper"))
    pruner.prune(model, random_token_batches())
    assert len(set(pruner.last_plan.experts_per_layer.values())) > 1  # non-uniform: needs the carried counts
    return pruner.save_pretrained(model, tmp_path_factory.mktemp("q") / "pruned"), pruner.last_plan


def test_torchao_int8_round_trip_keeps_counts_and_logits(pruned_folder, tmp_path):
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import AutoModelForCausalLM, TorchAoConfig

    folder, plan = pruned_folder
    quantized = AutoModelForCausalLM.from_pretrained(folder, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    counts = {layer.index: layer.num_experts for layer in find_moe_layers(quantized)[1]}
    assert counts == plan.experts_per_layer
    assert "Int8" in type(quantized.model.layers[0].self_attn.q_proj.weight).__name__  # really quantized
    expected = logits(quantized.eval())
    quantized.save_pretrained(tmp_path / "int8")
    config = json.loads((tmp_path / "int8" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"  # the grape layout was replaced...
    assert config["num_local_experts_per_layer"] == [plan.experts_per_layer[i] for i in range(4)]  # ...not the counts
    assert torch.equal(logits_in_fresh_process(tmp_path / "int8"), expected)


def test_carried_counts_resize_any_quantizers_empty_model():
    from transformers.quantizers.base import HfQuantizer

    from optimum_grape.checkpoint.requantized import carried_layout

    model = tiny_model("mixtral")
    model.config.num_local_experts_per_layer = [8, 5, None, 6]
    assert carried_layout(model.config)["experts_per_layer"] == {"0": 8, "1": 5, "3": 6}

    class Recording(HfQuantizer):  # any other quantizer: sees the model already resized
        def _process_model_before_weight_loading(self, model, **kwargs):
            self.seen = [layer.num_experts for layer in find_moe_layers(model)[1]]

        def is_serializable(self, **kwargs):
            return True

        @property
        def is_trainable(self):
            return False

    quantizer = Recording(type("Q", (), {"quant_method": "recording", "to_dict": lambda self: {}})())
    quantizer.preprocess_model(model)
    assert quantizer.seen == [8, 5, 8, 6]


def test_counts_alone_rebuild_a_checkpoint_without_quantization_config(pruned_folder, tmp_path):
    """A tool that drops quantization_config (or a dequantized copy) keeps loading."""
    import shutil

    from transformers import AutoModelForCausalLM

    folder, plan = pruned_folder
    stripped = tmp_path / "stripped"
    shutil.copytree(folder, stripped)
    config = json.loads((stripped / "config.json").read_text())
    del config["quantization_config"]
    (stripped / "config.json").write_text(json.dumps(config))
    expected = logits(AutoModelForCausalLM.from_pretrained(folder).eval())
    model = AutoModelForCausalLM.from_pretrained(stripped).eval()
    assert {layer.index: layer.num_experts for layer in find_moe_layers(model)[1]} == plan.experts_per_layer
    assert torch.equal(logits(model), expected)


def test_what_the_carrier_wraps_still_exists_with_the_signature_it_expects():
    """checkpoint/requantized.py wraps transformers internals (there is no official hook for a layout
    that must outlive a later quantizer): this fails the day transformers renames or reshapes them."""
    import inspect

    import transformers.modeling_utils  # noqa: F401  (loads the quantizers: the wrappers are installed)
    from optimum_grape.checkpoint.requantized import WRAPPED, _MARK
    from transformers.quantizers import auto
    from transformers.quantizers.base import HfQuantizer

    assert WRAPPED == ("transformers.quantizers.auto.get_hf_quantizer", "transformers.modeling_utils.get_hf_quantizer",
                       "transformers.quantizers.base.HfQuantizer.preprocess_model")
    for function in (auto.get_hf_quantizer, transformers.modeling_utils.get_hf_quantizer,
                     HfQuantizer.preprocess_model):
        assert getattr(function, _MARK, False), function
    original = inspect.signature(inspect.unwrap(auto.get_hf_quantizer))
    assert list(original.parameters)[:2] == ["config", "quantization_config"]
    assert list(inspect.signature(inspect.unwrap(HfQuantizer.preprocess_model)).parameters)[:2] == ["self", "model"]
    source = inspect.getsource(transformers.modeling_utils)
    assert "from .quantizers.auto import get_hf_quantizer" in source and "get_hf_quantizer(" in source

