"""`GrapeModelForCausalLM`: optimum-style loading that prunes on the way in.

    model = GrapeModelForCausalLM.from_pretrained("base", pruning_config=GrapeConfig(pruning_ratio=0.25))

`pruning_config` is not a transformers kwarg; this wrapper loads the base model normally, then
prunes it with a `GrapePruner` (kept on `model.grape_pruner` for saving with the plan and card).
The same works natively as `AutoModelForCausalLM.from_pretrained(base, quantization_config=GrapeConfig(...))`.
"""

from __future__ import annotations

from transformers import AutoModelForCausalLM, AutoTokenizer

from .config import GrapeConfig
from .pruner import GrapePruner


class GrapeModelForCausalLM:
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, pruning_config: GrapeConfig | None = None,
                        calibration_data=None, tokenizer=None, **kwargs):
        pruner = GrapePruner(pruning_config) if pruning_config is not None else None  # validate before loading
        model = AutoModelForCausalLM.from_pretrained(pretrained_model_name_or_path, **kwargs)
        if pruner is None:
            return model
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path,
                                                      trust_remote_code=kwargs.get("trust_remote_code", False))
        pruner.prune(model, calibration_data, tokenizer)
        model.grape_pruner = pruner
        return model
