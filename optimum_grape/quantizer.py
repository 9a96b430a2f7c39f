"""transformers integration: the 'grape' quantization config and quantizer.

A pruned checkpoint's config.json says `"quant_method": "grape"` and carries the per-layer
counts; `_process_model_before_weight_loading` shrinks each MoE block of the empty model to those
counts before weights load. Given a base checkpoint and a GrapeConfig without a layout,
`_process_model_after_weight_loading` prunes it instead (calibrating on `config.dataset`), the way
GPTQ quantizes on load.
"""

from __future__ import annotations

import logging

from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from .config import GrapeConfig

logger = logging.getLogger("optimum_grape")


class GrapeHfQuantizer(HfQuantizer):
    requires_calibration = False

    def validate_environment(self, *args, **kwargs) -> None:
        self.quantization_config.validate()

    def _process_model_before_weight_loading(self, model, **kwargs):
        from .merging.apply import resize_to_layout

        layout = self.quantization_config.pruned_layout
        if layout:
            resize_to_layout(model, layout)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        # Pruning changes shapes, not number formats: transformers marks models loaded through a
        # quantizer as quantized, which forbids .half()/.float() and plain fine-tuning. Undo that.
        model.is_quantized = False
        if self.quantization_config.pruned_layout:
            return model
        from transformers import AutoTokenizer

        from .pruner import GrapePruner

        config = self.quantization_config
        source = getattr(model, "name_or_path", None) or model.config._name_or_path
        tokenizer = AutoTokenizer.from_pretrained(source) if source else None
        pruner = GrapePruner(GrapeConfig.from_dict({**config.to_dict(), "pruned_layout": None}))
        pruner.prune(model, None, tokenizer)
        config.pruned_layout = model.config.quantization_config.pruned_layout
        model.config.quantization_config = config
        model.grape_plan = pruner.last_plan
        return model

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True


def register_with_transformers() -> None:
    """Idempotent: transformers' own register_* helpers raise on a second registration. Also lets the
    per-layer counts survive a later quantizer (checkpoint/requantized.py)."""
    from .checkpoint.requantized import install

    install()
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get("grape") is not GrapeConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING["grape"] = GrapeConfig
    if AUTO_QUANTIZER_MAPPING.get("grape") is not GrapeHfQuantizer:
        AUTO_QUANTIZER_MAPPING["grape"] = GrapeHfQuantizer
