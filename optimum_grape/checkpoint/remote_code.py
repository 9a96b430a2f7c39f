"""Loading a pruned checkpoint where optimum-grape is not installed: the Hub's remote-code route.

A checkpoint whose MoE layers keep different numbers of experts cannot be built by plain
transformers (one count per model). Beside the weights we write `modeling_grape_pruned.py`, a small
self-contained file (torch and transformers only) with a config and a model class that subclass the
base family's and give each layer its own expert count before the weights load, and name them in
config.json's `auto_map`; `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` then
loads the checkpoint anywhere transformers runs (lm-eval, `transformers serve`, notebooks).

The file is checked before it is kept: its model class is built on the meta device from the saved
config and must give every tensor the shape of the pruned model's. A family it cannot rebuild keeps
no `auto_map`; config.json says why in `grape_remote_code` (and so does the model card).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

REMOTE_FILE = "modeling_grape_pruned.py"
CONFIG_CLASS = "GrapePrunedConfig"

TEMPLATE = '''"""Loads this checkpoint, pruned by optimum-grape (each MoE layer keeps its own number of routed
experts), with plain transformers:

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

Self-contained (torch and transformers only). The classes subclass {config_class} and {model_class};
after the base model is built, each MoE layer's routed experts and router are resized to the count in
`num_local_experts_per_layer` (shared experts, dense layers and attention are untouched), then the
weights load as usual. With optimum-grape installed and imported, loading without remote code works too.
"""

import torch
import transformers
from torch import nn
from transformers import {config_class}

COUNT_ATTRIBUTES = ("num_experts", "num_local_experts", "n_routed_experts")
# routing settings a layer may override when its count no longer splits into its router's groups
OVERRIDE_ATTRIBUTES = {{"n_group": ("num_group", "n_group"), "topk_group": ("topk_group",)}}


def _grape_quantizer_registered():
    try:
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
    except ImportError:
        return False
    return "grape" in AUTO_QUANTIZER_MAPPING


class {config_name}({config_class}):
    def __init__(self, **kwargs):
        quantization = kwargs.get("quantization_config")
        if isinstance(quantization, dict) and quantization.get("quant_method") == "grape" \\
                and not _grape_quantizer_registered():
            # The layout is applied by this file; without optimum-grape, transformers has no 'grape'
            # quantizer and would only warn about an unknown quantization type.
            kwargs.pop("quantization_config")
        super().__init__(**kwargs)


def _fused_experts(module):
    """A child named `experts` holding 3-D tensors with the experts on dim 0: (module, count)."""
    experts = getattr(module, "experts", None)
    if not isinstance(experts, nn.Module):
        return None
    shapes = [t.shape[0] for t in experts.parameters(recurse=False) if t.dim() == 3]
    return (experts, shapes[0]) if shapes and len(set(shapes)) == 1 else None


def _resize(owner, name, tensor, axis, count):
    shape = list(tensor.shape)
    shape[axis] = count
    new = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
    if isinstance(tensor, nn.Parameter):
        setattr(owner, name, nn.Parameter(new, requires_grad=tensor.requires_grad))
    else:
        owner.register_buffer(name, new, persistent=name not in owner._non_persistent_buffers_set)


ROUTER_NAMES = ("gate", "router")


def _routing_modules(block, experts):
    """The experts, the block itself (per-expert vectors such as a correction bias) and its router:
    the children named gate or router, with their sub-modules. Never shared experts or attention."""
    found = [experts, block]
    for name, child in block.named_children():
        if name in ROUTER_NAMES:
            found += list(child.modules())
    return found


def _resize_block(block, experts, old, count, overrides):
    for module in _routing_modules(block, experts):
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for name, tensor in own:
            if tensor is None or tensor.dim() == 0:
                continue
            if module is block and tensor.dim() != 1:  # on the block itself, only per-expert vectors
                continue
            axes = [0] if module is experts else [a for a, size in enumerate(tensor.shape) if size == old][:1]
            if axes and tensor.shape[axes[0]] == old:
                _resize(module, name, tensor, axes[0], count)
        for attribute in COUNT_ATTRIBUTES:
            if getattr(module, attribute, None) == old:
                setattr(module, attribute, count)
        if isinstance(module, nn.Linear) and module.out_features == old:
            module.out_features = count
        for key, value in overrides.items():
            for attribute in OVERRIDE_ATTRIBUTES.get(key, (key,)):
                if hasattr(module, attribute):
                    setattr(module, attribute, value)


def resize_experts(model, config):
    counts = getattr(config, "num_local_experts_per_layer", None) or []
    overrides = getattr(config, "grape_routing_overrides", None) or {{}}
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    for index, layer in enumerate(decoder.layers):
        count = counts[index] if index < len(counts) else None
        if count is None:
            continue
        for block in layer.modules():
            found = _fused_experts(block)
            if found is not None:
                experts, old = found
                if old != count or overrides.get(str(index)):
                    _resize_block(block, experts, old, count, overrides.get(str(index), {{}}))


def _keep_weight_conversions():
    """transformers skips its checkpoint key conversions for remote-code classes unless they are
    registered: register its own again, under the key it is found by (the class name, else the model
    type). Re-registering the model type with the same list keeps one lookup per model: under the
    class name, the inner base model would match the model type too and rename keys twice."""
    try:
        from transformers import conversion_mapping as mapping
    except ImportError:
        return
    for key in ("{model_class}", "{model_type}"):
        conversions = mapping.get_checkpoint_conversion_mapping(key)
        if conversions is not None:
            mapping.register_checkpoint_conversion_mapping(key, conversions, overwrite=True)
            return


_keep_weight_conversions()


# The base class's own name: transformers keys some checkpoint conversions (renamed weights) by it.
class {model_class}(transformers.{model_class}):
    config_class = {config_name}

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        resize_experts(self, config)

    @classmethod
    def _can_set_experts_implementation(cls):
        # transformers looks for `@use_experts_implementation` in the source of the module defining the
        # class, which is this file; the experts are the base class's, so answer as it does (else the
        # experts fall back to 'eager': slower, and not the kernels a plain load runs).
        return transformers.{model_class}._can_set_experts_implementation()
'''


def _auto_class_key(architecture: str) -> str | None:
    """The auto class whose mapping holds `architecture` (causal LM, image-text-to-text, ...)."""
    from transformers.models.auto import modeling_auto

    for key, mapping in (("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
                         ("AutoModelForImageTextToText", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"),
                         ("AutoModelForSeq2SeqLM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
                         ("AutoModelForTokenClassification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES")):
        if architecture in getattr(modeling_auto, mapping, {}).values():
            return key
    return None


def remote_source(config_class: str, model_class: str, model_type: str) -> str:
    return TEMPLATE.format(config_class=config_class, model_class=model_class, config_name=CONFIG_CLASS,
                           model_type=model_type)


def _load_classes(path: Path, model_class: str):
    spec = importlib.util.spec_from_file_location(f"grape_remote_check_{id(path)}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, CONFIG_CLASS), getattr(module, model_class)


def write_remote_code(folder: Path, model) -> str:
    """Write the modeling file and `auto_map` into the saved `folder` when its layers keep different
    counts; returns what was done (also recorded in config.json as `grape_remote_code`)."""
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    counts = [c for c in config.get("num_local_experts_per_layer") or [] if c is not None]
    architecture = (config.get("architectures") or [type(model).__name__])[0]
    key = _auto_class_key(architecture)
    if len(set(counts)) <= 1:
        reason = "not needed: every layer keeps the same count, which plain transformers reads"
    elif config.get("auto_map"):
        reason = "not written: the base model already ships remote code (load it with trust_remote_code=True " \
                 "and optimum-grape imported)"
    elif key is None:
        reason = f"not written: {architecture} is in none of transformers' auto classes"
    else:
        config_class = type(model.config).__name__
        if not hasattr(__import__("transformers"), architecture):
            reason = f"not written: transformers exports no class {architecture}"
            config["grape_remote_code"] = reason
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            return reason
        source = remote_source(config_class, architecture, model.config.model_type)
        path = folder / REMOTE_FILE
        path.write_text(source, encoding="utf-8")
        reason = _check(path, model, architecture)
        if reason is None:
            config["auto_map"] = {"AutoConfig": f"{REMOTE_FILE[:-3]}.{CONFIG_CLASS}",
                                  key: f"{REMOTE_FILE[:-3]}.{architecture}"}
            reason = f"written: {REMOTE_FILE}, loaded by {key}.from_pretrained(path, trust_remote_code=True)"
        else:
            path.unlink()
    config["grape_remote_code"] = reason
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return reason


def _check(path: Path, model, architecture: str) -> str | None:
    """None when the remote model class, built empty from this config, has every tensor of `model`
    with the same shape and every module the same settings; else why not."""
    try:
        config_class, model_class = _load_classes(path, architecture)
        config = config_class.from_dict({k: v for k, v in model.config.to_dict().items()
                                         if k not in ("quantization_config", "auto_map")})
        with torch.device("meta"):
            rebuilt = model_class(config)
    except Exception as error:  # noqa: BLE001 -- any family-specific failure only means: no remote code
        return f"not written: the generic resize cannot build {type(model).__name__} ({type(error).__name__}: " \
               f"{str(error).splitlines()[0] if str(error) else ''})"
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    wrong = sorted(k for k in want if got.get(k) != want[k])
    sys.modules.pop(model_class.__module__, None)
    if wrong:
        return f"not written: the generic resize gives other shapes for {len(wrong)} tensor(s), e.g. {wrong[0]}"
    # Forward reads counts and routing settings from module attributes: they must match too.
    modules = dict(rebuilt.named_modules())
    for name, module in model.named_modules():
        other = modules.get(name)
        if other is None:
            continue
        for key, value in _settings(module).items():
            if _settings(other).get(key, value) != value:
                return f"not written: the generic resize leaves {name or 'the model'}.{key} = " \
                       f"{_settings(other)[key]!r}, the pruned model has {value!r}"
    return None


def _settings(module) -> dict:
    """A module's plain-number and text attributes (what forward may read besides its tensors)."""
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str))}
