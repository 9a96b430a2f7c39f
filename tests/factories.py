"""Tiny MoE models built from the real transformers config classes, with random weights, and
helpers to plant redundancy in them. One table drives the family test matrix. Also: a tiny pruned
model, and constructed statistics with planted structure for the methods' known-answer tests."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import transformers as tf
from transformers import AutoModelForCausalLM

if TYPE_CHECKING:
    from optimum_grape.stats import ExpertStats

COMMON = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, num_experts_per_tok=2)
MLA = dict(kv_lora_rank=16, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=8, head_dim=4)
# DeepSeek/GLM4 style: layer 0 dense, 2 groups of experts, the best group chosen per token.
GROUPED = dict(intermediate_size=64, moe_intermediate_size=48, n_shared_experts=1, first_k_dense_replace=1,
               n_group=2, topk_group=1)

FAMILIES = {
    "mixtral": lambda layers, experts: tf.MixtralConfig(**COMMON, intermediate_size=48, num_hidden_layers=layers,
                                                        num_local_experts=experts),
    "qwen3_moe": lambda layers, experts: tf.Qwen3MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=48,
                                                           num_hidden_layers=layers, num_experts=experts,
                                                           head_dim=8, norm_topk_prob=True),
    "olmoe": lambda layers, experts: tf.OlmoeConfig(**COMMON, intermediate_size=48, num_hidden_layers=layers,
                                                    num_experts=experts),
    # shared expert + sigmoid gate; layer 1 dense through mlp_only_layers
    "qwen2_moe": lambda layers, experts: tf.Qwen2MoeConfig(
        **COMMON, intermediate_size=64, moe_intermediate_size=48, shared_expert_intermediate_size=48,
        num_hidden_layers=layers, num_experts=experts, mlp_only_layers=[1], decoder_sparse_step=1,
        norm_topk_prob=False),
    # hybrid linear/full attention; every second layer sparse through decoder_sparse_step
    "qwen3_next": lambda layers, experts: tf.Qwen3NextConfig(
        **COMMON, head_dim=8, intermediate_size=64, moe_intermediate_size=48, shared_expert_intermediate_size=48,
        num_hidden_layers=layers, num_experts=experts, decoder_sparse_step=1, mlp_only_layers=[0],
        linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
        norm_topk_prob=True),
    "deepseek_v2": lambda layers, experts: tf.DeepseekV2Config(
        **COMMON, **MLA, **GROUPED, q_lora_rank=None, num_hidden_layers=layers, n_routed_experts=experts,
        topk_method="group_limited_greedy", routed_scaling_factor=1.5),
    "deepseek_v3": lambda layers, experts: tf.DeepseekV3Config(
        **COMMON, **MLA, **GROUPED, q_lora_rank=16, num_hidden_layers=layers, n_routed_experts=experts,
        routed_scaling_factor=2.5, norm_topk_prob=True),
    "glm4_moe": lambda layers, experts: tf.Glm4MoeConfig(
        **COMMON, **GROUPED, head_dim=8, num_hidden_layers=layers, n_routed_experts=experts,
        routed_scaling_factor=1.5, norm_topk_prob=True),
    "gpt_oss": lambda layers, experts: tf.GptOssConfig(
        **COMMON, head_dim=8, intermediate_size=48, num_hidden_layers=layers, num_local_experts=experts,
        sliding_window=8),
    "phimoe": lambda layers, experts: tf.PhimoeConfig(**COMMON, intermediate_size=48, num_hidden_layers=layers,
                                                      num_local_experts=experts),
    "granitemoe": lambda layers, experts: tf.GraniteMoeConfig(**COMMON, intermediate_size=48,
                                                              num_hidden_layers=layers, num_local_experts=experts),
    # moe_statics correction bias [1, E]; layer 0 dense (moe_layer_start_index)
    "ernie4_5_moe": lambda layers, experts: tf.Ernie4_5_MoeConfig(
        **COMMON, intermediate_size=64, moe_intermediate_size=48, num_hidden_layers=layers,
        moe_num_experts=experts, moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_interval=1),
}
CORE_FAMILIES = ("mixtral", "qwen3_moe", "olmoe")


def expert_tensors(experts) -> dict[str, torch.Tensor]:
    """Per-expert tensors of an experts module: fused [E, ...] parameters, or a ModuleList's stacked ones."""
    if isinstance(experts, torch.nn.ModuleList):
        names = [n for n, _ in experts[0].named_parameters()]
        return {n: torch.stack([dict(e.named_parameters())[n] for e in experts]) for n in names}
    n = experts.down_proj.shape[0]
    return {name: p for name, p in experts.named_parameters(recurse=False) if p.shape[0] == n}


def scale_like_trained(model, seed: int = 0) -> None:
    """Default inits make experts nearly silent (and many routers all-zero): give experts, routers and
    routing biases enough scale that which expert runs changes the logits, as in a trained model."""
    from optimum_grape.adapters import find_moe_layers

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in find_moe_layers(model, verify=False)[1]:
            for name, tensor in layer.router.named_parameters():
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * (0.5 if tensor.dim() == 2 else 0.1))
            for name, buffer in layer.router.named_buffers():  # e_score_correction_bias
                buffer.copy_(torch.randn(buffer.shape, generator=gen) * 0.05)
            if isinstance(layer.experts, torch.nn.ModuleList):
                for p in layer.experts.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            else:
                for tensor in expert_tensors(layer.experts).values():
                    tensor.copy_(torch.randn(tensor.shape, generator=gen) * (0.3 if tensor.dim() == 3 else 0.05))


def tiny_model(family: str = "mixtral", layers: int = 4, experts: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    if family == "modulelist":
        from tiny_remote_moe import tiny_remote_moe

        return tiny_remote_moe(layers, experts, seed)
    config = FAMILIES[family](layers, experts)
    model = AutoModelForCausalLM.from_config(config).eval()
    scale_like_trained(model, seed)
    return model


def plant_copies(model, layer: int, copies: list[int], source: int | None = None, noise: float = 0.0) -> None:
    """Make experts `copies` of decoder layer `layer` equal to `source` (default: the first copy)."""
    from optimum_grape.adapters import find_moe_layers

    _, layers = find_moe_layers(model)
    block = next(l for l in layers if l.index == layer)
    source = copies[0] if source is None else source
    with torch.no_grad():
        if isinstance(block.experts, torch.nn.ModuleList):
            for c in copies:
                for p, q in zip(block.experts[c].parameters(), block.experts[source].parameters()):
                    p.copy_(q + noise * torch.randn_like(q))
            return
        for tensor in expert_tensors(block.experts).values():
            for c in copies:
                tensor[c] = tensor[source] + noise * torch.randn_like(tensor[source])


def random_token_batches(n: int = 8, length: int = 32, vocab: int = 96, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=gen) for _ in range(n)]


def pruned_model():
    """A tiny Mixtral with two experts of every layer merged (no calibration), and its pruner."""
    from optimum_grape import GrapePruner, PruningPlan

    model, pruner = tiny_model("mixtral"), GrapePruner(pruning_ratio=0.25)
    plan = PruningPlan(clusters={l: [[0, 1]] + [[e] for e in range(2, 8)] for l in range(4)},
                       num_experts_before={l: 8 for l in range(4)})
    pruner.apply(model, plan)
    return model, pruner


# -- constructed statistics: known answers for the methods (tests/methods) --------------------
ROUTING = {"top_k": 2, "scoring": "softmax", "norm_topk_prob": True}


def synthetic_stats(layers=4, experts=8, hidden=6, hot_layer=2, seed=0, tokens=64) -> ExpertStats:
    """Statistics with planted structure: in `hot_layer`, experts 0-5 produce the same outputs."""
    from optimum_grape.stats import ExpertStats, LayerStats

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for l in range(layers):
        outputs = torch.randn(experts, tokens, hidden, generator=gen)
        if l == hot_layer:
            outputs[1:6] = outputs[0] + 0.01 * torch.randn(5, tokens, hidden, generator=gen)
        logits = torch.randn(tokens, experts, generator=gen)
        flat = outputs.flatten(1)
        unit = torch.nn.functional.normalize(flat, dim=-1)
        out[l] = LayerStats(
            num_experts=experts, floor=2, routing=ROUTING,
            router_weight=torch.randn(experts, hidden, generator=gen, dtype=torch.float64),
            tokens=torch.rand(experts, generator=gen, dtype=torch.float64) * 100 + 1,
            weight_mass=torch.rand(experts, generator=gen, dtype=torch.float64) * 50 + 1,
            saliency=torch.rand(experts, generator=gen, dtype=torch.float64) + 0.1,
            similarity=(unit @ unit.T).double(), mean_output=outputs.mean(1).double(),
            router_logits=logits, expert_outputs=outputs)
    return ExpertStats(layers=out, metadata={})


def plan_for(method, stats=None, **kwargs):
    from optimum_grape import GrapeConfig, GrapePruner

    kwargs.setdefault("num_experts_to_prune", 4)
    pruner = GrapePruner(GrapeConfig(method=method, **kwargs))
    return pruner.plan(stats or synthetic_stats())


def kept(plan, layer):
    return sorted(c[0] for c in plan.clusters[layer])
