"""Checking plans and statistics that come from outside (a JSON file, a safetensors header, an
edited object) before they can change a model.

Owns: the strict reading of a plan's structural fields (clusters, counts, merge and router weights,
method, router, align_neurons; never the free-form `metadata`), the check of a plan against the
model it is applied to (its MoE layers, their counts, the router's top-k, the model fingerprint),
and the check of a statistics file's header and tensors. Every error says the value, the allowed
range and the fix.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from .algorithms.merging import ROUTER_MODES
from .algorithms.similarity import SIMILARITIES
from .errors import PlanError, StatsError
from .adapters.fingerprint import model_fingerprint

logger = logging.getLogger("optimum_grape")
# Merge and router weights of a cluster are a convex combination: each in [0, 1], summing to 1.
WEIGHT_SUM_TOLERANCE = 1e-6
PLAN_FIX = "correct the plan file, or plan again with optimum-grape"
STATS_FIX = "recalibrate (GrapePruner.calibrate, or optimum-grape prune --save-stats) to get a valid file"
REQUIRED_STATS_TENSORS = ("router_weight", "tokens", "weight_mass", "saliency")
# Expected shape of each statistics tensor: E = experts of the layer, H = hidden size, T = sampled tokens.
STATS_SHAPES = {"router_weight": "EH", "tokens": "E", "weight_mass": "E", "saliency": "E", "max_output": "E",
                "similarity": "EE", "mean_output": "EH", "router_logits": "TE", "expert_outputs": "ETH"}
NON_NEGATIVE = ("tokens", "weight_mass", "saliency", "max_output")
SCORINGS = ("softmax", "sigmoid")


# -- typed readers: JSON gives strings for keys and floats where ints belong ---------------------------
def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def layer_key(key: Any, where: str, error=PlanError) -> int:
    if is_int(key) and key >= 0:
        return key
    if isinstance(key, str) and key.isascii() and key.isdigit():
        return int(key)
    raise error(f"{where}: key {key!r} is not a decoder-layer index (an integer >= 0).")


def mapping(value: Any, where: str, error=PlanError) -> dict:
    if not isinstance(value, dict):
        raise error(f"{where} must be a JSON object, got {type(value).__name__} {_short(value)}.")
    return value


def integer(value: Any, where: str, low: int, error=PlanError) -> int:
    if not is_int(value) or value < low:
        raise error(f"{where}={_short(value)} must be an integer >= {low}.")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _rows(value: Any, where: str, valid, wanted: str) -> list[list]:
    """A list of lists whose items all pass `valid` (described by `wanted`)."""
    if not isinstance(value, list) or not all(isinstance(row, list) for row in value):
        raise PlanError(f"{where} must be a list of lists (one per cluster), got {_short(value)}; {PLAN_FIX}.")
    for row in value:
        for item in row:
            if not valid(item):
                raise PlanError(f"{where} holds {_short(item)}, but must hold {wanted}; {PLAN_FIX}.")
    return [list(row) for row in value]


# -- plans --------------------------------------------------------------------------------------------
def normalise_plan(plan) -> None:
    """Read the structural fields of `plan` strictly (layer keys as ints, ids as ints, weights as
    finite floats) and in place; raise PlanError on anything else."""
    def expert_id(x) -> bool:
        return is_int(x) and x >= 0

    clusters = {layer_key(k, "Plan clusters"): _rows(v, f"Plan clusters[{k}]", expert_id, "expert ids (integers >= 0)")
                for k, v in mapping(plan.clusters, "Plan clusters").items()}
    before = {layer_key(k, "Plan num_experts_before"): integer(v, f"Plan num_experts_before[{k}]", 1)
              for k, v in mapping(plan.num_experts_before, "Plan num_experts_before").items()}
    if set(before) != set(clusters):
        raise PlanError(f"Plan num_experts_before names layers {sorted(before)} but clusters name {sorted(clusters)}; "
                        f"each planned layer needs both; {PLAN_FIX}.")
    weights = {}
    for name in ("merge_weights", "router_weights"):
        weights[name] = {layer_key(k, f"Plan {name}"): [[float(x) for x in row] for row in _rows(
            v, f"Plan {name}[{k}]", is_number, "finite numbers in [0, 1] summing to 1 per cluster")]
                         for k, v in mapping(getattr(plan, name), f"Plan {name}").items()}
        extra = sorted(set(weights[name]) - set(clusters))
        if extra:
            raise PlanError(f"Plan {name} has layers {extra} that its clusters do not plan; {PLAN_FIX}.")
    if not isinstance(plan.method, str) or not plan.method:
        raise PlanError(f"Plan method={_short(plan.method)} must be a method name (a non-empty string).")
    if plan.router not in ROUTER_MODES:
        raise PlanError(f"Plan router={_short(plan.router)} is not one of {list(ROUTER_MODES)}.")
    if not isinstance(plan.align_neurons, bool):
        raise PlanError(f"Plan align_neurons={_short(plan.align_neurons)} must be true or false.")
    mapping(plan.metadata, "Plan metadata")
    fingerprint = mapping(plan.model_fingerprint, "Plan model_fingerprint")
    if not all(isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in fingerprint.items()):
        raise PlanError(f"Plan model_fingerprint={_short(fingerprint)} must map names to strings.")
    plan.clusters, plan.num_experts_before = clusters, before
    plan.merge_weights, plan.router_weights = weights["merge_weights"], weights["router_weights"]


def check_plan(plan) -> None:
    """Every planned layer: clusters partition 0..E-1 exactly once, weights are convex per cluster."""
    if not plan.clusters:
        raise PlanError("The plan plans no layer (empty clusters); plan with optimum-grape or list the clusters of "
                        "at least one MoE layer.")
    for layer, clusters in sorted(plan.clusters.items()):
        members = sorted(m for c in clusters for m in c)
        if len(members) != plan.num_experts_before[layer]:  # before building 0..E-1 for any E written there
            raise PlanError(f"Plan layer {layer}: clusters must partition experts 0..{plan.num_experts_before[layer] - 1} "
                            f"exactly once; they hold {len(members)} expert ids.")
        expected = list(range(plan.num_experts_before[layer]))
        if members != expected or any(not c for c in clusters):
            raise PlanError(f"Plan layer {layer}: clusters must partition experts 0..{expected[-1]} exactly once; "
                            f"got {_short(clusters)}.")
        for name in ("merge_weights", "router_weights"):
            weights = getattr(plan, name).get(layer)
            if weights is None:
                continue
            if [len(w) for w in weights] != [len(c) for c in clusters]:
                raise PlanError(f"Plan layer {layer}: {name} do not match the clusters' sizes "
                                f"{[len(c) for c in clusters]}; {PLAN_FIX}.")
            for cluster, w in zip(clusters, weights):
                if any(x < 0.0 or x > 1.0 for x in w) or abs(math.fsum(w) - 1.0) > WEIGHT_SUM_TOLERANCE:
                    raise PlanError(
                        f"Plan layer {layer}: {name} {w} of cluster {cluster} must each lie in [0, 1] and sum to 1 "
                        f"(within {WEIGHT_SUM_TOLERANCE:g}), e.g. [1.0, 0.0] keeps the representative; {PLAN_FIX}.")


def check_plan_dict(data: Any, known: set[str]) -> dict:
    """The keys of a plan read from JSON: every structural field present, nothing unknown, and
    `experts_per_layer` (derived) consistent with the clusters. Returns the constructor's kwargs."""
    data = dict(mapping(data, "A plan"))
    required = ("clusters", "num_experts_before", "merge_weights", "router_weights", "method", "router",
                "align_neurons")
    missing = [k for k in required if k not in data]
    if missing:
        raise PlanError(f"The plan is missing {missing}; a plan file needs all of {list(required)} (optimum-grape "
                        f"writes them in grape_plan.json); {PLAN_FIX}.")
    unknown = sorted(set(data) - known - {"experts_per_layer"})
    if unknown:
        raise PlanError(f"The plan has unknown fields {unknown}; known fields are {sorted(known)} (free-form notes "
                        "belong in 'metadata').")
    derived = data.pop("experts_per_layer", None)
    if derived is not None:
        clusters = mapping(data["clusters"], "Plan clusters")
        counts = {str(k): len(v) if isinstance(v, list) else None for k, v in clusters.items()}
        if mapping(derived, "Plan experts_per_layer") != counts:
            raise PlanError(f"Plan experts_per_layer {_short(derived)} disagrees with its clusters {_short(counts)}; "
                            "experts_per_layer is derived from clusters: edit the clusters (or drop the field).")
    return data


def check_plan_weights_present(plan) -> None:
    """A plan FILE gives the merge and router weights of every layer it plans: a missing entry would
    silently mean 'keep the representative' (plans built in Python may rely on that default)."""
    for name in ("merge_weights", "router_weights"):
        missing = sorted(set(plan.clusters) - set(getattr(plan, name)))
        if missing:
            raise PlanError(f"The plan file gives no {name} for layers {missing}; give one list per cluster "
                            f"(e.g. [1.0, 0.0] keeps the representative); {PLAN_FIX}.")


def check_plan_fits(plan, adapter, layers, model=None) -> dict:
    """Everything `apply_plan` could refuse, checked for every layer before any layer changes:
    the layer is an MoE layer of this model, has the planned count, keeps at least its router's
    top-k; with `model`, the plan's model fingerprint matches. Returns {layer index: MoELayer}."""
    by_index = {layer.index: layer for layer in layers}
    targets = {}
    for index, clusters in sorted(plan.clusters.items()):
        layer = by_index.get(index)
        if layer is None:
            raise PlanError(f"The plan prunes decoder layer {index}, which is not an MoE layer of this model "
                            f"(MoE layers: {sorted(by_index)}).")
        if layer.num_experts != plan.num_experts_before[index]:
            raise PlanError(f"Layer {index} has {layer.num_experts} experts but the plan was made for "
                            f"{plan.num_experts_before[index]}: apply a plan to the model it was planned on, unpruned.")
        floor = adapter.layer_floor(layer)
        if len(clusters) < floor:
            raise PlanError(
                f"The plan leaves decoder layer {index} with {len(clusters)} expert(s), but its router selects the "
                f"top {layer.top_k} and needs at least {floor}; merge fewer experts there (keep >= {floor} clusters).")
        targets[index] = layer
    if model is not None:
        check_fingerprint(plan.model_fingerprint, model)
    return targets


def check_fingerprint(recorded: dict, model, actual: dict | None = None) -> None:
    """Refuse a plan made for another model (or from its statistics): architecture and router
    weights must match (`actual`: the model's fingerprint when it cannot be read off `model`)."""
    if not recorded:
        logger.warning("The plan carries no model fingerprint (written by hand or by an older optimum-grape): it "
                       "cannot be checked against this model.")
        return
    actual = actual or model_fingerprint(model)
    differ = [k for k in ("model_type", "architecture", "router_sha256")
              if recorded.get(k) and actual.get(k) and recorded[k] != actual[k]]
    if differ:
        detail = "; ".join(f"{k}: {recorded[k]} there, {actual[k]} here" for k in differ)
        raise PlanError(f"The plan was made for a different model ({detail}). Apply it to the model it was planned on; "
                        "if you know it fits (e.g. the same model re-saved in another way), pass check_model=False "
                        "(CLI: --force-plan).")


# -- statistics --------------------------------------------------------------------------------------
def parse_stats_header(header: Any, meta_fields: set[str]) -> tuple[dict[int, dict], dict]:
    """The layers and metadata of a statistics header, checked: counts, floors, routing."""
    header = mapping(header, "Statistics header grape_stats", StatsError)
    if set(header) != {"layers", "metadata"}:
        raise StatsError(f"Statistics header has fields {sorted(header)}, expected ['layers', 'metadata']; "
                         f"{STATS_FIX}.")
    metadata = mapping(header["metadata"], "Statistics metadata", StatsError)
    for name in ("model_type", "architecture", "similarity"):
        if metadata.get(name) is not None and not isinstance(metadata[name], str):
            raise StatsError(f"Statistics metadata {name}={_short(metadata[name])} must be a string; {STATS_FIX}.")
    if metadata.get("similarity") not in (None, *SIMILARITIES):
        raise StatsError(f"Statistics metadata similarity={_short(metadata['similarity'])} is not one of "
                         f"{list(SIMILARITIES)}; {STATS_FIX}.")
    layers = {}
    for key, meta in mapping(header["layers"], "Statistics layers", StatsError).items():
        index = layer_key(key, "Statistics layers", StatsError)
        where = f"Statistics layer {index}"
        meta = dict(mapping(meta, where, StatsError))
        unknown, missing = set(meta) - meta_fields, {"num_experts", "floor", "routing"} - set(meta)
        if unknown or missing:
            raise StatsError(f"{where} has unknown fields {sorted(unknown)} / lacks {sorted(missing)}; {STATS_FIX}.")
        experts = integer(meta["num_experts"], f"{where} num_experts", 1, StatsError)
        routing = mapping(meta["routing"], f"{where} routing", StatsError)
        top_k = integer(routing.get("top_k"), f"{where} routing.top_k", 1, StatsError)
        floor = integer(meta["floor"], f"{where} floor", 1, StatsError)
        if not top_k <= floor <= experts:
            raise StatsError(f"{where}: floor={floor} must lie between the router's top_k={top_k} and the "
                             f"{experts} experts; the file was edited or is corrupt; {STATS_FIX}.")
        _check_routing(routing, where, experts)
        if meta.get("sensitivity") is not None:
            _check_sensitivity(meta["sensitivity"], where)
        layers[index] = meta
    if not layers:
        raise StatsError(f"The statistics hold no MoE layer; {STATS_FIX}.")
    return layers, metadata


def _check_routing(routing: dict, where: str, experts: int) -> None:
    if routing["top_k"] > experts:
        raise StatsError(f"{where}: routing.top_k={routing['top_k']} exceeds its {experts} experts; {STATS_FIX}.")
    if "scoring" in routing and routing["scoring"] not in SCORINGS:
        raise StatsError(f"{where}: routing.scoring={_short(routing['scoring'])} is not one of {list(SCORINGS)}.")
    if "norm_topk_prob" in routing and not isinstance(routing["norm_topk_prob"], bool):
        raise StatsError(f"{where}: routing.norm_topk_prob={_short(routing['norm_topk_prob'])} must be a bool.")
    for name, low in (("n_group", 1), ("min_grouped", 0)):
        if name in routing:
            integer(routing[name], f"{where} routing.{name}", low, StatsError)


def _check_sensitivity(value: Any, where: str) -> None:
    value = mapping(value, f"{where} sensitivity", StatsError)
    if not all(is_number(value.get(k)) and value[k] >= 0 for k in ("kl", "local_cost")) \
            or not is_int(value.get("merges")):
        raise StatsError(f"{where} sensitivity={_short(value)} needs finite kl >= 0, local_cost >= 0 and an integer "
                         f"merges; {STATS_FIX}.")


def check_stats_tensors(layers: dict[int, dict], tensors: dict[str, torch.Tensor], fields: tuple[str, ...]) -> None:
    """Every tensor belongs to a known layer and field, has the expected shape, is finite, and the
    per-expert counts are non-negative with a finite total; the required ones are present."""
    for key, tensor in tensors.items():
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit() or int(parts[1]) not in layers \
                or parts[2] not in fields:
            raise StatsError(f"Statistics tensor {key!r} is not 'layers.<MoE layer>.<field>' with a field of "
                             f"{list(fields)}; {STATS_FIX}.")
    for index, meta in sorted(layers.items()):
        sizes = {"E": meta["num_experts"]}
        for name in fields:
            tensor = tensors.get(f"layers.{index}.{name}")
            where = f"Statistics layer {index} {name}"
            if tensor is None:
                if name in REQUIRED_STATS_TENSORS:
                    raise StatsError(f"{where} is missing; every layer needs {list(REQUIRED_STATS_TENSORS)}; "
                                     f"{STATS_FIX}.")
                continue
            if not tensor.is_floating_point():
                raise StatsError(f"{where} has dtype {tensor.dtype}; statistics are floating point; {STATS_FIX}.")
            _check_shape(tensor, STATS_SHAPES.get(name), sizes, where)
            total = tensor.double().sum()
            if not bool(torch.isfinite(tensor).all()) or not bool(torch.isfinite(total)):
                raise StatsError(f"{where} holds NaN, infinite or overflowing values; {STATS_FIX}.")
            if name in NON_NEGATIVE and bool((tensor < 0).any()):
                raise StatsError(f"{where} holds negative values ({float(tensor.min()):g}); counts and norms are >= 0; "
                                 f"{STATS_FIX}.")


def _check_shape(tensor: torch.Tensor, spec: str | None, sizes: dict[str, int], where: str) -> None:
    """Match `tensor.shape` against letters (E, H, T): E is fixed by the header, the first tensor
    naming H or T fixes it for the layer (all sampled-token tensors share the same tokens)."""
    if spec is None:
        return
    ok = tensor.dim() == len(spec) and all(size >= 1 for size in tensor.shape)
    for letter, size in zip(spec, tensor.shape) if ok else ():
        if sizes.setdefault(letter, size) != size:
            ok = False
    if not ok:
        wanted = ", ".join(str(sizes.get(c, c)) for c in spec)
        raise StatsError(f"{where} has shape {tuple(tensor.shape)}, expected [{wanted}]; {STATS_FIX}.")
