"""Which model types of the installed transformers have MoE experts, read from its own files."""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
import transformers
from transformers.models.auto import modeling_auto
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

FUSED_MARKER = "@use_experts_implementation"
EXPERTS_ATTRIBUTE = re.compile(r"self\.experts\s*=")
# Model classes tried in this order: a multimodal model's ...ForConditionalGeneration first (it holds the
# text decoder and the towers), then a causal LM, then token classification (an encoder-only MoE).
TASKS = ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
         "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
         "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES")


def models_dir() -> Path:
    return Path(os.path.dirname(transformers.__file__)) / "models"


def _sources() -> dict[str, str]:
    found = {}
    for folder in sorted(models_dir().iterdir()):
        source = folder / f"modeling_{folder.name}.py"
        if source.is_file():
            found[folder.name] = source.read_text(encoding="utf-8")
    return found


def fused_modules() -> list[str]:
    """Modeling folders whose modeling file decorates an experts class with `@use_experts_implementation`."""
    return [name for name, text in _sources().items() if FUSED_MARKER in text]


def other_moe_modules() -> list[str]:
    """Modeling folders with a `self.experts = ...` block but no fused experts (older or custom layouts)."""
    return [name for name, text in _sources().items() if FUSED_MARKER not in text and EXPERTS_ATTRIBUTE.search(text)]


def model_types_of(module: str) -> list[str]:
    return [mt for mt in CONFIG_MAPPING_NAMES if model_type_to_module_name(mt) == module]


def main_model_type(module: str) -> str | None:
    """The model type a user runs for this modeling folder: the folder's own name first, then any other
    of its model types with a task head whose class has a forward pass (Qwen3-Omni's top class only
    generates; its thinker is the multimodal LM)."""
    types = model_types_of(module)
    for model_type in sorted(types, key=lambda mt: mt != module):
        if model_class_for(model_type) is not None:
            return model_type
    return None


def task_class_names(model_type: str) -> list[str]:
    return [name for task in TASKS if (name := getattr(modeling_auto, task, {}).get(model_type))]


def model_class_for(model_type: str):
    """The first task class of `model_type` (TASKS order) that implements `forward`, or None."""
    package = __import__(f"transformers.models.{model_type_to_module_name(model_type)}", fromlist=["_"])
    for name in task_class_names(model_type):
        cls = getattr(transformers, name, None) or getattr(package, name, None)
        if cls is not None and cls.forward is not torch.nn.Module.forward:
            return cls
    return None
