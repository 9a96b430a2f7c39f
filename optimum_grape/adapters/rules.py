"""The routing rules a fused-experts adapter tries on a router it has not been told about, and what it
answers once `routing.verify` has kept one (`RoutingSpec`, logits, correction bias, scale).

The candidates come from the layer's structure only: every per-expert vector of the router or the
block named like a bias may be a correction bias (added to the scores, or to the logits, before
top-k), one named like a scale may multiply the chosen weights; scores are softmax, sigmoid or
sqrt-softplus, renormalised or not; a router with `num_group` > 1 may be group-limited; a float
attribute named like a multiplier may scale the logits, one named like a softcap may cap them. A
family registered with `routing={...}` fixes some of these fields and is only tried with them.
"""

from __future__ import annotations

import itertools

import torch

from ..errors import UnsupportedModelError
from .base import MoELayer, RoutingSpec
from .routing import LayerRouting, check_finite, learnt, router_logits_of, verify

SCORINGS = ("softmax", "sigmoid", "sqrtsoftplus")
ROUTER_LOGIT_NEEDS = {"router_logits", "expert_outputs"}  # statistics that include router logits on samples


def _router_input_error(layer: MoELayer) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"The router of {layer.name!r} does not read the experts' input (a norm or a projection sits between "
        "them), so router logits cannot be computed from calibration samples: methods that need them "
        "(router_merge, enumerate) cannot run on this family; pick another method.")


def _vectors(layer: MoELayer, word: str) -> list[str]:
    """Paths (below the block) of per-expert vectors of the router or the block whose name contains `word`."""
    n, block, found = layer.num_experts, layer.block, []
    names = {id(m): name for name, m in block.named_modules()}
    logits_owner = layer.logits if layer.logits is not None else layer.router
    for owner in [*layer.router.modules(), block]:
        tensors = list(owner.named_parameters(recurse=False)) + list(owner.named_buffers(recurse=False))
        for name, tensor in tensors:
            if word not in name.lower() or tensor is None or tensor.numel() != n:
                continue
            if owner is logits_owner and name == "bias":  # the Linear bias adds to the logits, not a choice bias
                continue
            prefix = names[id(owner)]
            found.append(f"{prefix}.{name}" if prefix else name)
    return found


def _float_attrs(module, word: str) -> list[float]:
    return [float(v) for k, v in vars(module).items()
            if word in k.lower() and isinstance(v, float) and v not in (0.0, 1.0)]


class InferredRouting:
    """Routing answers of an adapter: declared (`routing` fields), learnt by verification, or guessed."""

    routing: dict = {}  # RoutingSpec fields this family fixes (e.g. PhiMoE: {"top_k": 2})
    routing_check: str = "exact"  # "indices": the family's weights follow a rule planning only approximates

    def routing_candidates(self, layer: MoELayer, config):
        """LayerRouting candidates, most specific first (a present bias or scale before none)."""
        fixed = dict(self.routing)
        biases = _vectors(layer, "bias") + [None]
        scales = _vectors(layer, "scale") + [None]
        norm = getattr(layer.router, "norm_topk_prob", None)
        norms = [norm, not norm] if isinstance(norm, bool) else [True, False]
        logit_scales = [1.0] + _float_attrs(layer.router, "multiplier")
        caps = [0.0] + _float_attrs(layer.router, "softcap")
        half = [False, True] if layer.router_weight().dtype in (torch.float16, torch.bfloat16) else [False]
        for half_logits, scoring, bias, choice_on, groups, renorm, scale, logit_scale, cap in itertools.product(
                half, SCORINGS, biases, ("scores", "logits"), self.group_rules(layer), norms, scales, logit_scales, caps):
            if bias is None and choice_on == "logits":
                continue
            spec = RoutingSpec(**{"top_k": layer.top_k, "scoring": scoring, "norm_topk_prob": renorm,
                                  "choice_on": choice_on, **groups, **fixed})
            if any(getattr(spec, k) != v for k, v in fixed.items()):
                continue
            yield LayerRouting(spec, bias, scale, logit_scale, cap, half_logits, check=self.routing_check)

    def guessed_routing(self, layer: MoELayer, config) -> LayerRouting:
        """Before verification (on the meta device, for planning at scale): from the structure alone,
        sigmoid scores where there is a correction bias (the usual pairing), softmax otherwise."""
        first = next(iter(self.routing_candidates(layer, config)))
        scoring = "sigmoid" if first.choice_bias and "scoring" not in self.routing else first.spec.scoring
        return next((c for c in self.routing_candidates(layer, config) if c.spec.scoring == scoring), first)

    def layer_routing(self, layer: MoELayer, config) -> LayerRouting:
        return learnt(layer) or self.guessed_routing(layer, config)

    def routing_spec(self, layer: MoELayer, config) -> RoutingSpec:
        spec = self.layer_routing(layer, config).spec
        groups = self.group_spec(layer)  # planning constraints follow the router's current groups
        return RoutingSpec(**{**spec.to_dict(), "n_group": 1, "min_grouped": 0, **groups})

    def router_logits(self, layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
        routing = self.layer_routing(layer, None)
        if not routing.same_input:
            raise _router_input_error(layer)
        return router_logits_of(layer, routing, hidden)

    def check_needs(self, layers: list[MoELayer], needs) -> None:
        if set(needs) & ROUTER_LOGIT_NEEDS:
            for layer in layers:
                if not self.layer_routing(layer, None).same_input:
                    raise _router_input_error(layer)

    def prepare(self, model, layers) -> None:
        """Verify routing and experts on sample tokens once per model (refuse with the reason otherwise)."""
        if all(learnt(layer) is not None for layer in layers):
            return
        check_finite(model)
        verify(model, self, layers)
