"""Layer-by-layer pruning from disk: a checkpoint calibrated, planned and written one decoder layer
at a time, never materialised whole (`GrapeConfig(layer_by_layer=True)`,
`GrapePruner.prune_checkpoint`, `optimum-grape prune --layer-by-layer`).

`checkpoint_index.py` finds every tensor in the shards, `skeleton.py` builds the meta-device model
and loads one part of it, `stream.py` runs one layer on cached hidden states, `model.py` makes the
pruner's passes streamed passes, `writer.py` writes the pruned checkpoint shard by shard.
"""

from .model import LayerwiseModel

__all__ = ["LayerwiseModel"]
