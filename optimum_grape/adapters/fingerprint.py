"""The identity of the model a plan or statistics were computed for: its architecture and a SHA-256
of its router weights.

Router rows are what planning reads from a model, and they differ between any two trained models,
so their hash tells whether a plan meets the model it was made for. Rows are rounded to bfloat16
before hashing, so the same model loaded in float32, float16 or bfloat16 has the same fingerprint.
The model and its calibration statistics (which keep the router rows) give the same hash.
"""

from __future__ import annotations

import hashlib

import torch


def router_sha256(routers: dict[int, torch.Tensor]) -> str | None:
    """SHA-256 over every MoE layer's router weight [E, H], in layer order; None if one is not
    materialised (meta device, offloaded)."""
    digest = hashlib.sha256()
    for index, weight in sorted(routers.items()):
        if weight.device.type == "meta":
            return None
        rounded = weight.detach().to(torch.float32).to(torch.bfloat16).cpu().contiguous()
        digest.update(f"{index}:{list(rounded.shape)};".encode())
        digest.update(rounded.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def model_fingerprint(model) -> dict:
    from . import find_moe_layers

    _, layers = find_moe_layers(model)
    return {"model_type": model.config.model_type, "architecture": type(model).__name__,
            "router_sha256": router_sha256({layer.index: layer.router_weight() for layer in layers})}


def stats_fingerprint(stats) -> dict:
    """The fingerprint of the model `stats` were calibrated on (ExpertStats keep its router rows)."""
    return {"model_type": stats.metadata.get("model_type"), "architecture": stats.metadata.get("architecture"),
            "router_sha256": router_sha256({l: s.router_weight for l, s in stats.layers.items()})}
