"""Per-layer expert counts that survive a later quantizer.

A checkpoint holds one `quantization_config`. A pruned checkpoint's is the 'grape' layout; quantize
it afterwards (`from_pretrained(pruned, quantization_config=TorchAoConfig(...))`) and the saved
config.json says `"quant_method": "torchao"`, so the 'grape' quantizer that resized the empty
model no longer runs. The counts survive as the top-level `num_local_experts_per_layer` (and
`grape_routing_overrides`), and with `import optimum_grape` two small wrappers use them:

- loading a 'grape' checkpoint WITH another quantizer's config: the new quantizer takes over and
  quantizes from scratch (transformers alone would refuse the two configs);
- every other quantizer's `preprocess_model` first resizes the empty model's MoE layers to the
  carried counts, before it swaps in its quantized modules and the weights load;
- a checkpoint left with no `quantization_config` at all (dequantized, or stripped by a tool) and
  different counts per layer is loaded through the 'grape' quantizer rebuilt from the counts.
"""

from __future__ import annotations

import functools
import sys

_MARK = "__optimum_grape_carrier__"
# What this module wraps, checked by tests/checkpoint/test_requantized.py so that a transformers
# release that renames or reshapes them fails a test instead of silently dropping the counts.
WRAPPED = ("transformers.quantizers.auto.get_hf_quantizer", "transformers.modeling_utils.get_hf_quantizer",
           "transformers.quantizers.base.HfQuantizer.preprocess_model")


def _is_grape(quantization_config) -> bool:
    method = quantization_config.get("quant_method") if isinstance(quantization_config, dict) else \
        getattr(quantization_config, "quant_method", None)
    return method == "grape"


def carried_layout(config) -> dict | None:
    """The layout `resize_to_layout` needs, from the top-level attributes, or None."""
    counts = getattr(config, "num_local_experts_per_layer", None)
    if not counts:
        return None
    return {"experts_per_layer": {str(i): int(c) for i, c in enumerate(counts) if c is not None},
            "routing_overrides": getattr(config, "grape_routing_overrides", None) or {}}


def _wrap_get_hf_quantizer(original):
    @functools.wraps(original)
    def get_hf_quantizer(config, quantization_config, *args, **kwargs):
        stored = getattr(config, "quantization_config", None)
        if quantization_config is not None and not _is_grape(quantization_config) and _is_grape(stored):
            del config.quantization_config  # the layout stays in num_local_experts_per_layer
        elif quantization_config is None and stored is None:
            layout = carried_layout(config)  # e.g. dequantized, or quantization_config removed by a tool
            if layout and len(set(layout["experts_per_layer"].values())) > 1:
                config.quantization_config = {"quant_method": "grape", "pruned_layout": layout}
        return original(config, quantization_config, *args, **kwargs)

    setattr(get_hf_quantizer, _MARK, True)
    return get_hf_quantizer


def _wrap_preprocess_model(original):
    @functools.wraps(original)
    def preprocess_model(self, model, *args, **kwargs):
        layout = None if _is_grape(self.quantization_config) else carried_layout(model.config)
        if layout:
            from ..merging.apply import resize_to_layout

            resize_to_layout(model, layout)
        return original(self, model, *args, **kwargs)

    setattr(preprocess_model, _MARK, True)
    return preprocess_model


def install() -> None:
    """Idempotent. Runs when transformers has just loaded its quantizers, possibly while
    `transformers.modeling_utils` is still being imported: wrapping `get_hf_quantizer` where it is
    defined makes modeling_utils bind the wrapper; a modeling_utils loaded earlier is rebound too."""
    from transformers.quantizers import auto
    from transformers.quantizers.base import HfQuantizer

    if not getattr(auto.get_hf_quantizer, _MARK, False):
        auto.get_hf_quantizer = _wrap_get_hf_quantizer(auto.get_hf_quantizer)
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    if modeling_utils is not None and hasattr(modeling_utils, "get_hf_quantizer") \
            and not getattr(modeling_utils.get_hf_quantizer, _MARK, False):
        modeling_utils.get_hf_quantizer = auto.get_hf_quantizer
    if not getattr(HfQuantizer.preprocess_model, _MARK, False):
        HfQuantizer.preprocess_model = _wrap_preprocess_model(HfQuantizer.preprocess_model)
