"""Tiny models of any family from its OWN config class: the class defaults (the published model's
sizes), shrunk by key-name rules (hidden 32, 8 experts, top-2, 4 decoder layers that keep every
distinct per-layer pattern, small heads, vocabulary 128 with special ids moved inside it), applied at
every nesting level (text, vision, audio configs). `OVERRIDES` fixes the few defaults that cannot
build a model (MoE switched off by default, values validated against each other): test-fixture
knowledge, not pruning knowledge, which stays in `optimum_grape/adapters/`."""

from __future__ import annotations

import re

import torch
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

HIDDEN = 32
SIZE_RULES = [  # (key regex, value); first match wins; applied at every nesting level
    (r"^(num_experts|num_local_experts|n_routed_experts|moe_num_experts)$", 8),
    (r"^(num_experts_per_tok|num_experts_per_token|moe_k|moe_topk|top_k|moe_top_k)$", 2),
    (r".*intermediate_size.*|^(mlp_dim|ffn_dim|encoder_ffn_dim|dense_intermediate_size|moe_hidden_size)$", 64),
    (r"^(hidden_size|d_model|embed_dim|text_hidden_size|out_hidden_size|projector_hidden_size|"
     r"projection_hidden_dim|output_dim|router_hidden_size|merged_hidden_size|adapter_out_dim|adapter_in_dim|"
     r"adapter_input_size)$", HIDDEN),
    (r"^(num_attention_heads|num_heads|encoder_attention_heads|swa_num_attention_heads|linear_num_heads|"
     r"index_n_heads|mamba_n_heads|mamba_num_heads)$", 4),
    (r"^(num_key_value_heads|swa_num_key_value_heads|linear_num_key_heads)$", 2),
    (r"^linear_num_value_heads$", 4),
    (r"^(head_dim|swa_head_dim|linear_head_dim|linear_key_head_dim|linear_value_head_dim|index_head_dim|"
     r"mamba_head_dim|mamba_d_head|v_head_dim|qk_nope_head_dim)$", 8),
    (r"^qk_rope_head_dim$", 8),
    (r"^(kv_lora_rank|q_lora_rank|o_lora_rank|hc_lowrank|gated_norm_rank|loop_gate_rank)$", 16),
    (r"^(depth|encoder_layers|n_layers)$", 1),
    (r"^num_layers$", 2),
    (r"^(vocab_size|vocab_size_per_layer_input|unpadded_vocab_size)$", 128),
    (r"^(hidden_sizes|downsample_hidden_size|output_channels)$", 16),
    (r"^downsample_channels$", 32),
    (r"^hidden_size_per_layer_input$", 8),
    (r"^max_position_embeddings$", 256),
    (r"^(sliding_window|sliding_window_size)$", 16),
    (r"^(mamba_d_state|ssm_state_size)$", 8),
    (r"^index_topk$", 16),
]
LAYER_COUNT_KEYS = ("num_hidden_layers",)


def _shrink_value(key: str, value):
    for pattern, new in SIZE_RULES:
        if re.match(pattern, key):
            if isinstance(value, bool) or (value is None and new != 2):
                return value
            if value is None:  # an unset top-k
                return new
            if isinstance(value, int):
                return new if value > 0 else value
            if isinstance(value, list) and all(isinstance(v, int) for v in value):
                return [new if v > 0 else v for v in value]
            return value
    return value


def _per_layer_keys(d: dict, layers: int) -> list[str]:
    return [k for k, v in d.items() if isinstance(v, list) and len(v) == layers and k not in ("id2label",)]


def _layer_maps(d: dict) -> list[str]:
    """Keys of dicts keyed by layer index (`per_layer_config = {"05": {...}}`)."""
    return [k for k, v in d.items() if isinstance(v, dict) and v and all(str(i).isdigit() and isinstance(x, dict) for i, x in v.items())]


def _layer_value(d: dict, key: str, i: int):
    if isinstance(d[key], list):
        return d[key][i]
    return next((v for k, v in d[key].items() if int(k) == i), None)


def _pick_layers(d: dict, layers: int, keys: list[str], minimum: int = 3) -> list[int]:
    """Indices of layers to keep: the first of every distinct combination of per-layer settings, then
    the last layers until `minimum` (a dense-then-sparse pattern keeps both kinds, mostly sparse)."""
    seen, picked = set(), []
    for i in range(layers):
        combo = tuple(repr(_layer_value(d, k, i)) for k in keys)
        if combo not in seen:
            seen.add(combo)
            picked.append(i)
    for i in reversed(range(layers)):
        if len(picked) >= minimum:
            break
        if i not in picked:
            picked.append(i)
    return sorted(picked)


def _consistent(out: dict, d: dict) -> dict:
    """Re-derive values the defaults derived from others (latent attention head dims, groups)."""
    if out.get("kv_lora_rank") and out.get("num_key_value_heads"):  # latent attention: every head has its KV
        out["num_key_value_heads"] = out.get("num_attention_heads", 4)
    if "qk_nope_head_dim" in out and "qk_nope_head_dim" in d:  # dims that were sums of the others
        old_sum = (d["qk_nope_head_dim"] or 0) + (d.get("qk_rope_head_dim") or 0)
        for key in ("qk_head_dim", "head_dim", "swa_head_dim"):
            if key in out and d[key] == old_sum:
                out[key] = out["qk_nope_head_dim"] + (out.get("qk_rope_head_dim") or 0)
    for groups in ("n_group", "num_expert_group"):
        if (out.get(groups) or 1) > 1:
            out[groups], out["topk_group"] = 2, 1
    if (out.get("first_k_dense_replace") or 0) > 1:  # one dense layer is enough to check it stays dense
        out["first_k_dense_replace"] = 1
    return out


def _is_layer_reference(values: list) -> bool:
    """A per-layer list naming, for each layer, itself or an earlier layer (kv_source_layers)."""
    return all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= i for i, v in enumerate(values)) \
        and len(set(values)) > len(values) // 2  # mostly distinct: not a pattern of small flags


def _layer_sets(d: dict, layers: int, per_layer: list[str]) -> list[str]:
    """Keys `*_layers` holding a set of layer indices (index_layers, mlp_only_layers)."""
    return [k for k, v in d.items() if k.endswith("_layers") and k not in per_layer and isinstance(v, list) and v
            and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < layers for i in v)]


def _shrink_layers(out: dict, d: dict) -> None:
    layers = d.get("num_hidden_layers")
    if not isinstance(layers, int) or layers <= 0:
        return
    keys, maps = _per_layer_keys(d, layers), _layer_maps(d)
    # Lists that name layers are renumbered to the kept layers, and are not what makes layers distinct.
    references = [k for k in keys if _is_layer_reference(d[k])]  # e.g. kv_source_layers: each its own or earlier
    sets = _layer_sets(d, layers, keys)
    keys = [k for k in keys if k not in references]
    picked = _pick_layers(d, layers, keys + maps, minimum=min(layers, 4))
    for k in keys:
        out[k] = [out[k][i] for i in picked]
    for k in references:  # a reference to a layer not kept becomes the layer itself
        out[k] = [picked.index(d[k][i]) if d[k][i] in picked else new for new, i in enumerate(picked)]
    for k in sets:
        out[k] = [picked.index(i) for i in d[k] if i in picked]
    for k in maps:
        width = len(str(next(iter(d[k]))))
        out[k] = {}
        for new, old in enumerate(picked):
            entry = _layer_value(d, k, old)
            if entry is not None:
                out[k][str(new).zfill(width)] = _consistent({kk: _shrink_value(kk, vv) for kk, vv in entry.items()},
                                                            entry)
    out["num_hidden_layers"] = len(picked)


def _renumber_special_tokens(out: dict) -> None:
    vocab = out.get("vocab_size")
    if not isinstance(vocab, int):
        return
    spare = iter(range(vocab - 1, 90, -1))
    for key in list(out):
        if re.search(r"token_(id|index)$", key) and isinstance(out[key], int) and out[key] >= vocab:
            out[key] = next(spare)
        elif key == "eos_token_id" and isinstance(out[key], list):
            out[key] = [v if v < vocab else next(spare) for v in out[key]]


def shrink_dict(d: dict, sub_configs: dict) -> dict:
    out = {}
    for key, value in d.items():
        if key in sub_configs and isinstance(value, dict):
            out[key] = shrink_dict(value, getattr(sub_configs[key], "sub_configs", {}) or {})
        else:
            out[key] = _shrink_value(key, value)
    _shrink_layers(out, d)
    _renumber_special_tokens(out)
    return _consistent(out, d)


# What the rules cannot guess: MoE switched off by default, values validated against each other.
OVERRIDES = {
    "gemma4": {"text_config.enable_moe_block": True, "text_config.num_experts": 8, "text_config.top_k_experts": 2,
               "text_config.moe_intermediate_size": 32},
    "diffusion_gemma": {"text_config.enable_moe_block": True, "text_config.num_experts": 8,
                        "text_config.top_k_experts": 2, "text_config.moe_intermediate_size": 32},
    "dots3_note": {"text_config.head_dim": 16},
    "dots1": {"n_routed_experts": 8, "n_shared_experts": 1, "first_k_dense_replace": 1},
    "deepseek_ocr2": {"text_config.mlp_layer_types": ["dense", "sparse", "sparse", "sparse"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv", "full_attention"], "num_dense_layers": 1},
    "hunyuan_v1_moe": {"head_dim": 8},
    "qwen4_exp": {"text_config.indexer_n_heads": 2, "text_config.indexer_kv_heads": 1,
                  "text_config.indexer_head_dim": 8, "text_config.indexer_budget": 8,
                  "text_config.indexer_compress_ratio": 2},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1},
    "granitemoehybrid": {"mamba_d_head": 16, "mamba_n_groups": 1,
                         "layer_types": ["mamba", "attention", "mamba", "attention"]},
    "nemotron_h": {"n_groups": 2, "moe_latent_size": 16, "layers_block_type": ["linear_attention", "moe", "full_attention", "moe", "mlp"]},
    "qwen3_omni_moe": {"talker_config.text_config.shared_expert_intermediate_size": 32,
                       "talker_config.spatial_merge_size": 2},
    "zaya": {"num_experts_per_tok": 1},
    "ernie4_5_vl_moe": {"text_config.rope_parameters": {"rope_type": "default", "rope_theta": 500000.0,
                                                        "mrope_section": [1, 1, 2]}},
    "glm4v_moe": {"text_config.num_attention_heads": 2, "text_config.num_key_value_heads": 2,
                  "text_config.rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                  "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1]}},
    "dbrx": {"attn_config.rope_theta": 10000.0},
    "kolibri1_1": {"head_dim": 16, "index_num_heads": 1},
    "step3p7": {"text_config.sliding_window": 16},
    "hy_v4_vl": {"text_config.rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                 "mrope_section": [2, 1, 1]}},
}


def tiny_config(model_type: str, overrides: dict | None = None):
    config_class = CONFIG_MAPPING[model_type]
    overrides = {**OVERRIDES.get(model_type, {}), **(overrides or {})}
    d = config_class().to_dict()
    d = shrink_dict(d, getattr(config_class, "sub_configs", {}) or {})
    for key, value in overrides.items():
        target = d
        *path, last = key.split(".")
        for p in path:
            target = target[p]
        target[last] = value
    d.pop("model_type", None)
    return config_class.from_dict(d)


def build_tiny(model_type: str, model_class=None, overrides: dict | None = None, seed: int = 0):
    from .discover import model_class_for

    config = tiny_config(model_type, overrides)
    torch.manual_seed(seed)
    cls = model_class or model_class_for(model_type)
    return cls._from_config(config).eval()


@torch.no_grad()
def scale_like_trained(model, seed: int = 0) -> None:
    """Default inits leave routers near zero (every token a tie) and experts nearly silent: give every
    router tensor, per-expert vector and expert tensor enough random scale that which expert runs
    changes the logits, as in a trained model."""
    from ..adapters import find_moe_layers

    gen = torch.Generator().manual_seed(seed)
    adapter, layers = find_moe_layers(model, verify=False)
    for layer in layers:
        routing = [getattr(owner, name) for owner, name, _ in adapter.routing_tensors(layer)] \
            if hasattr(adapter, "routing_tensors") else list(layer.router.parameters())
        for tensor in routing:
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * (0.5 if tensor.dim() == 2 and min(tensor.shape) > 1
                                                                      else 0.1))
        for tensor in layer.experts.parameters():
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * (0.3 if tensor.dim() == 3 else 0.05))
