"""Verifying an adapter on the model before it is used: one forward pass on sample tokens, and every
MoE layer must then show that

- the adapter's routing rule (a `RoutingSpec` applied to the router's logits by
  `algorithms.selection.top_k_routing`, with the layer's correction bias and per-expert scale)
  picks the experts the model's own router picked, with the same weights (up to one constant factor,
  `RoutingSpec.scale`, learnt here), and
- the adapter's `run_experts` reproduces what the model's experts module returned.

For a family with no registered rule, the rule is inferred: the candidates an adapter lists
(scoring, renormalisation, which per-expert vector is a correction bias or a scale, groups, a logit
multiplier or cap) are tried in order and the first that reproduces the router is kept (`learnt`).
Anything unexplained raises `UnsupportedModelError` with what was tried, before any calibration.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from ..algorithms.selection import routing_choice, top_k_routing
from ..errors import UnsupportedModelError
from .base import RoutingSpec

SAMPLE_TOKENS = 32


@dataclass(frozen=True)
class LayerRouting:
    """What a layer's router does, as verified: the rule and where its per-expert vectors live."""

    spec: RoutingSpec
    choice_bias: str | None = None  # path below the sparse block of a vector added to the choice values
    expert_scale: str | None = None  # path of a vector multiplying each chosen expert's weight
    logit_scale: float = 1.0  # the router multiplies its logits by this (MuseSpark's output_multiplier)
    logit_softcap: float = 0.0  # cap * tanh(logits / cap) when > 0
    half_logits: bool = False  # the router computes its logits in the model's (half) dtype, not in float32
    same_input: bool = True  # the router reads the experts' input (False: a norm or a projection in between)
    check: str = "exact"  # "exact": experts and weights verified; "indices": which experts only


_LEARNT: "weakref.WeakKeyDictionary[nn.Module, LayerRouting]" = weakref.WeakKeyDictionary()


def learnt(layer) -> LayerRouting | None:
    return _LEARNT.get(layer.router)


def tensor_at(root: nn.Module, path: str | None) -> torch.Tensor | None:
    if path is None:
        return None
    owner, _, name = path.rpartition(".")
    return getattr(root.get_submodule(owner) if owner else root, name)


@dataclass
class Observation:
    router_input: list = dataclasses.field(default_factory=list)
    expert_input: list = dataclasses.field(default_factory=list)
    index: list = dataclasses.field(default_factory=list)
    weights: list = dataclasses.field(default_factory=list)
    expert_output: list = dataclasses.field(default_factory=list)

    def cat(self, name: str) -> torch.Tensor:
        return torch.cat([t.reshape(-1, t.shape[-1]) for t in getattr(self, name)])


def _special_ids(config, found: set) -> set:
    for key, value in config.to_dict().items() if hasattr(config, "to_dict") else ():
        if key.endswith(("token_id", "token_index", "token_ids")):
            found.update(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int))
    for key in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            _special_ids(sub, found)
    return found


def sample_ids(model: nn.Module, length: int = SAMPLE_TOKENS, seed: int = 0) -> torch.Tensor:
    """Random ordinary token ids (no image/audio placeholders or other special ids)."""
    vocab = model.get_input_embeddings().num_embeddings
    allowed = torch.tensor(sorted(set(range(vocab)) - _special_ids(model.config, set())))
    pick = torch.randint(0, len(allowed), (1, length), generator=torch.Generator().manual_seed(seed))
    return allowed[pick]


def _arg(args, kwargs, position: int, names: tuple[str, ...]):
    if len(args) > position:
        return args[position]
    return next((kwargs[n] for n in names if n in kwargs), None)


@torch.no_grad()
def observe(model: nn.Module, layers, run=None) -> dict[int, Observation]:
    """Router inputs and the experts' inputs, routing and outputs of every layer on sample tokens.
    `run()` runs them (default: the model's forward; layer-by-layer mode runs one loaded layer)."""
    seen = {layer.index: Observation() for layer in layers}
    handles = []

    def on_router(obs):
        return lambda module, args: obs.router_input.append(args[0].detach())

    def on_experts(obs):
        def hook(module, args, kwargs, output):
            obs.expert_input.append(_arg(args, kwargs, 0, ("hidden_states",)).detach())
            obs.index.append(_arg(args, kwargs, 1, ("top_k_index", "router_indices")).detach())
            obs.weights.append(_arg(args, kwargs, 2, ("top_k_weights", "routing_weights")).detach())
            obs.expert_output.append((output[0] if isinstance(output, tuple) else output).detach())
        return hook

    was_training = model.training
    try:
        for layer in layers:
            logits_module = layer.logits if layer.logits is not None else layer.router
            handles.append(logits_module.register_forward_pre_hook(on_router(seen[layer.index])))
            handles.append(layer.experts.register_forward_hook(on_experts(seen[layer.index]), with_kwargs=True))
        model.eval()
        try:
            if run is None:
                model(input_ids=sample_ids(model).to(model.get_input_embeddings().weight.device))
            else:
                run()
        except (RuntimeError, ValueError, TypeError, NotImplementedError, AttributeError, IndexError) as error:
            raise UnsupportedModelError(
                f"{type(model).__name__} could not run on sample tokens, which verifying its MoE layers needs "
                f"({type(error).__name__}: {error}). Check that the model runs `model(input_ids=...)`.") from error
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for layer in layers:
        obs = seen[layer.index]
        if not obs.index or len(obs.router_input) != len(obs.index):
            raise UnsupportedModelError(
                f"MoE block {layer.name!r}: on sample tokens its router ran {len(obs.router_input)} time(s) and its "
                f"experts {len(obs.index)}; cannot pair routing with experts. Register the family with an adapter.")
    return seen


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-4 if dtype in (torch.float32, torch.float64) else 1e-2


def check_experts(adapter, layer, obs: Observation) -> None:
    """The adapter's `run_experts`, weighted by the model's routing, must give the experts' output."""
    hidden, index, weights, want = (obs.cat(n) for n in ("expert_input", "index", "weights", "expert_output"))
    got = torch.zeros_like(want, dtype=torch.float32)
    for e in torch.unique(index).tolist():
        tok, pos = torch.where(index == e)
        if 0 <= e < layer.num_experts:
            got.index_add_(0, tok, adapter.run_experts(layer, hidden[tok], [e])[0].float() * weights[tok, pos, None].float())
    error = float((got - want.float()).norm() / want.float().norm().clamp_min(1e-12))
    if error > _tolerance(want.dtype) * 10:
        raise UnsupportedModelError(
            f"MoE block {layer.name!r} ({type(layer.experts).__name__}): the experts' output is not what running "
            f"each expert as up (-> gate) -> down{' -> post-expert norm' if layer.experts.has_post_expert_norm else ''} "
            f"gives (relative error {error:.2e}); this expert layout is not recognised. Register the family with an "
            "adapter whose `run_experts` matches it (docs/adding_a_family.md).")


def router_logits_of(layer, routing: LayerRouting, hidden: torch.Tensor) -> torch.Tensor:
    weight = layer.router_weight()
    owner = layer.logits if layer.logits is not None else layer.router
    bias = getattr(owner, "bias", None)
    bias = bias if isinstance(bias, torch.Tensor) and bias.shape == weight.shape[:1] else None
    if routing.half_logits:
        logits = nn.functional.linear(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))
    else:
        logits = nn.functional.linear(hidden.float(), weight.float(), None if bias is None else bias.float())
    logits = logits.float() * routing.logit_scale
    if routing.logit_softcap > 0:
        logits = torch.tanh(logits / routing.logit_softcap) * routing.logit_softcap
    return logits


def predict(layer, routing: LayerRouting, logits: torch.Tensor, top_k: int | None = None):
    """(weights, index) the rule gives for `logits`; weights without `spec.scale`."""
    spec = routing.spec
    bias = tensor_at(layer.block, routing.choice_bias)
    bias = bias.float().flatten() if bias is not None else None
    weights, index = top_k_routing(logits, spec.scoring, top_k or spec.top_k, spec.norm_topk_prob,
                                   **spec.choice_options(bias))
    scale = tensor_at(layer.block, routing.expert_scale)
    if scale is not None:
        weights = weights * scale.float().flatten()[index]
    return weights, index


def compare(layer, routing: LayerRouting, obs: Observation) -> tuple[LayerRouting | None, str]:
    """The candidate with its weight scale fitted, or None and why it does not reproduce the router."""
    logits = router_logits_of(layer, routing, obs.cat("router_input"))
    index, weights = obs.cat("index").long(), obs.cat("weights").float()
    if index.shape[1] != routing.spec.top_k:
        return None, f"the router picks {index.shape[1]} experts per token, not top_k={routing.spec.top_k}"
    pred_w, pred_i = predict(layer, routing, logits)
    same = (pred_i.sort(-1).values == index.sort(-1).values).all(-1)
    spec, bias = routing.spec, tensor_at(layer.block, routing.choice_bias)
    _, choice = routing_choice(logits, spec.scoring, **spec.choice_options(
        bias.float().flatten() if bias is not None else None))
    precision = 1e-6 if obs.router_input[0].dtype in (torch.float32, torch.float64) else 1e-2  # rounding flips ties
    tie = (choice.gather(-1, pred_i).sort(-1).values - choice.gather(-1, index).sort(-1).values).abs().max(-1).values \
        <= precision * choice.abs().max().clamp_min(1)
    if not bool((same | tie).all()):
        return None, f"{int((~same).sum())}/{len(same)} sample tokens routed to other experts"
    if int(same.sum()) * 2 < len(same):
        return None, "most sample tokens are ties between experts (an untrained router?)"
    if routing.check == "indices":
        return routing, ""
    order_p, order_m = pred_i[same].sort(-1).indices, index[same].sort(-1).indices
    p, m = pred_w[same].gather(-1, order_p), weights[same].gather(-1, order_m)
    scale = float((p * m).sum() / (p * p).sum().clamp_min(1e-30))
    if not torch.allclose(p * scale, m, rtol=_tolerance(obs.weights[0].dtype), atol=1e-6):
        error = float(((p * scale - m).abs() / m.abs().clamp_min(1e-6)).max())
        return None, f"the experts match but not their weights (max relative error {error:.1e})"
    scale = 1.0 if abs(scale - 1.0) < 1e-5 else round(scale, 6)
    return dataclasses.replace(routing, spec=dataclasses.replace(spec, scale=scale)), ""


@torch.no_grad()
def check_finite(model) -> None:
    """Refuse NaN or Inf weights by name, before routing is verified: a NaN propagates to every later
    layer, so the routing check would blame the wrong layer and the wrong cause."""
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if type(tensor.data) is not torch.Tensor:  # a quantized tensor subclass (torchao, bnb): ops are limited
            continue
        if tensor.is_meta or not tensor.is_floating_point() or _all_finite(tensor):
            continue
        bad = (~torch.isfinite(tensor)).nonzero()[0].tolist()
        where = f" (expert {bad[0]})" if tensor.dim() == 3 else ""
        raise UnsupportedModelError(
            f"{name}{where} holds NaN or Inf at index {bad}: the weights are damaged (or a training run diverged). "
            "Load an intact copy of the model; pruning cannot repair it.")


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite. A NaN or Inf anywhere makes the sum non-finite, so a finite sum
    settles it in one read of the tensor (isfinite would also write a mask as large as it); only a sum
    that overflowed, or a damaged tensor, takes the exact element-wise check."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


@torch.no_grad()
def verify(model: nn.Module, adapter, layers) -> None:
    """Learn and verify every layer's routing and experts on sample tokens, or refuse the model."""
    observations = observe(model, layers)
    for layer in layers:
        verify_layer(adapter, layer, observations[layer.index], model.config)


@torch.no_grad()
def verify_layer(adapter, layer, obs: Observation, config) -> None:
    """Learn and verify one layer's routing and experts from what it did on sample tokens."""
    check_experts(adapter, layer, obs)
    tried = []
    for candidate in adapter.routing_candidates(layer, config):
        found, why = compare(layer, candidate, obs)
        if found is not None:
            same = obs.cat("router_input").shape == obs.cat("expert_input").shape and \
                torch.equal(obs.cat("router_input"), obs.cat("expert_input"))
            _LEARNT[layer.router] = dataclasses.replace(found, same_input=same)
            return
        tried.append(f"{describe(candidate)}: {why}")
    raise UnsupportedModelError(
        f"MoE block {layer.name!r} of model_type {config.model_type!r}: routing rule not recognised. The "
        f"router {type(layer.router).__name__} chose experts or weights that no rule tried reproduces on "
        f"sample tokens ({'; '.join(tried[:4])}{'; ...' if len(tried) > 4 else ''}; {len(tried)} rules "
        "tried). Register the family with an adapter that describes its router (docs/adding_a_family.md).")


def describe(routing: LayerRouting) -> str:
    spec, parts = routing.spec, [routing.spec.scoring, f"top-{routing.spec.top_k}"]
    if routing.choice_bias:
        parts.append(f"+{routing.choice_bias} on {spec.choice_on}")
    if spec.n_group > 1:
        parts.append(f"{spec.n_group} groups ({spec.group_score})")
    parts.append("renormalised" if spec.norm_topk_prob else "not renormalised")
    if routing.expert_scale:
        parts.append(f"x {routing.expert_scale}")
    if routing.logit_scale != 1.0 or routing.logit_softcap:
        parts.append(f"logits x {routing.logit_scale} cap {routing.logit_softcap}")
    if routing.half_logits:
        parts.append("logits in the model's dtype")
    return ", ".join(parts)
