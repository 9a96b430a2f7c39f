"""`LayerwiseModel`: a checkpoint pruned without ever being loaded whole.

It offers `GrapePruner` the three passes the in-memory path makes over a model, each as ONE pass
over the decoder layers, loading a layer from disk, using it and freeing it:

- `record`: the calibration batches flow through the layers; every MoE layer's recorder sees them
  and is finalised (similarities need the layer's weights) before the layer is freed; the adapter
  verifies itself on sample tokens in the same pass, layer by layer, as it does on a whole model;
- `score_plans`: the unpruned stream and one stream per candidate plan (a plan changes the stream
  from the first layer it prunes on), then the model's head: the KL terms `planning/scoring.py` sums;
- `write_pruned`: each layer is loaded, merged (with calibration data on its streamed inputs, which
  its already-merged predecessors produced), written as a shard and freed.

Only the non-layer weights (embeddings, final norm, head), one decoder layer and the cached hidden
states of the calibration batches are in memory at a time. Given a scratch folder with room, each
layer is converted from the checkpoint's layout once and read back from a scratch copy by the later
passes (`scratch.py`); writing deletes each copy as it reads it for the last time. Every layer runs
the same operations on the same inputs as inside the full forward, so the statistics, the plan and
the weights are those of the in-memory path.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from ..adapters import find_moe_layers
from ..adapters.routing import learnt, observe, sample_ids, verify_layer
from ..merging.apply import Snapshot, apply_clusters, record_layout
from ..calibration.recorder import set_batch
from ..planning.scoring import stream_scores
from ..adapters.fingerprint import router_sha256
from ..merging.with_data import assemble_inputs
from .skeleton import REST, Skeleton
from ..calibration.stream import capture, experts_inputs, head_logits, run_layer
from .writer import ShardWriter, write_config

logger = logging.getLogger("optimum_grape")


class LayerwiseModel:
    def __init__(self, folder, trust_remote_code: bool = False, scratch_beside=None) -> None:
        """`scratch_beside`: the output folder, beside which the converted layers are kept between passes
        when its disk has room (`LayerScratch.if_room`); None converts every layer on every load."""
        self.skeleton = Skeleton(folder, trust_remote_code, scratch_beside=scratch_beside)
        self.module = self.skeleton.model  # what adapters, configs and fingerprints read
        self.config = self.module.config
        self.layers = self.skeleton.layers
        self.skeleton.load(REST)
        self.peak_layer_bytes = 0

    def _moe(self):
        adapter, layers = find_moe_layers(self.module, verify=False)
        return adapter, {layer.index: layer for layer in layers}

    def _layer_loop(self, order, verifier, last: bool = False):
        """Load each decoder layer in `order` (then the MoE layers the forward never reached), yield its
        index while it is in memory (after the verifier has checked it), free it. `last`: no pass
        follows, so each layer's scratch copy is deleted once it is loaded."""
        never_run = [i for i in self._moe()[1] if i not in order]
        scratch = self.skeleton.scratch
        for i in [*order, *never_run]:
            self.skeleton.load(i)
            if last and scratch is not None:
                scratch.drop(i)
            self.peak_layer_bytes = max(self.peak_layer_bytes, sum(p.numel() * p.element_size()
                                                                   for p in self.layers[i].parameters()))
            try:
                if verifier is not None and i in order:
                    verifier.step(i)
                yield i
            finally:
                self.skeleton.release(i)

    # -- calibration ------------------------------------------------------------------------------
    @torch.no_grad()
    def record(self, mine, recorders, finalize) -> dict:
        adapter, moe = self._moe()
        ids = [index for index, _ in mine]
        captured = capture(self.module, self.layers, [batch for _, batch in mine])
        states, stats = captured.inputs, {}
        verifier = self._verifier(adapter, moe)
        if verifier is not None:
            verifier.pause = lambda i: recorders[i].pause()  # sample tokens are not calibration data
        for i in self._layer_loop(captured.order, verifier):
            if i in captured.order:
                states = run_layer(self.layers, i, captured, states, before=lambda b: set_batch(recorders, ids[b]))
            if i in moe:
                stats[i] = finalize(recorders[i], moe[i])
        return stats

    def _verifier(self, adapter, moe):
        """Checks the adapter on sample tokens layer by layer, where the in-memory path checks it on the
        whole model (`adapters.routing.verify`); None when there is nothing to check."""
        if not callable(getattr(adapter, "prepare", None)) or all(learnt(layer) is not None for layer in moe.values()):
            return None
        return _Verifier(self, adapter, moe)

    def router_fingerprint(self) -> str | None:
        """SHA-256 of the router weights, read from disk one layer at a time (plans check it)."""
        _, moe = self._moe()
        routers = {}
        for i in sorted(moe):
            self.skeleton.load(i)
            try:
                routers[i] = moe[i].router_weight().detach().clone()
            finally:
                self.skeleton.release(i)
        return router_sha256(routers)

    # -- scoring candidate plans ------------------------------------------------------------------
    @torch.no_grad()
    def score_plans(self, plans, batches) -> list[list[tuple[float, int]]]:
        adapter, moe = self._moe()
        verifier = self._verifier(adapter, moe)
        return stream_scores(self.module, self.layers, (adapter, list(moe.values())), plans, batches,
                             lambda order: self._layer_loop(order, verifier))

    # -- applying the plan and writing the checkpoint -------------------------------------------
    @torch.no_grad()
    def write_pruned(self, folder, plan, pruning_config, merger, calibration_batches) -> None:
        """Apply `plan` layer by layer and write the pruned checkpoint's weights and config into `folder`.
        `merger`: the pruner's DataMerger (None: merge on weights only); it reads each layer's inputs
        from the streamed calibration states."""
        adapter, moe = self._moe()
        found = (adapter, list(moe.values()))
        apply_clusters_check(self, plan, found)
        writer = ShardWriter(folder, self.module, self.skeleton.used_conversions(),
                             getattr(adapter, "save_original_format", True))
        captured = capture(self.module, self.layers, calibration_batches) if merger is not None else None
        states = captured.inputs if captured is not None else None
        overrides = {}
        if merger is not None:
            merger.inputs_of = lambda layer: assemble_inputs(
                layer, experts_inputs(self.layers, layer.index, layer.experts, captured, states), merger.max_tokens,
                merger.seed)
        order = captured.order if captured is not None else list(range(len(self.layers)))
        written = set()
        for i in self._layer_loop(order + [j for j in range(len(self.layers)) if j not in order],
                                  self._verifier(adapter, moe), last=True):
            if i in plan.clusters:
                part = plan.restricted_to([i])
                apply_clusters(self.module, part, merger=merger, found=found)
                plan.clusters[i] = part.clusters[i]
                if i in part.merge_weights:
                    plan.merge_weights[i] = part.merge_weights[i]
                if i in part.router_weights:
                    plan.router_weights[i] = part.router_weights[i]
                overrides.update(part.metadata.get("routing_overrides", {}))
            if captured is not None and i in captured.order:
                states = run_layer(self.layers, i, captured, states)
            writer.write_part(self.layers[i].state_dict(prefix=f"{self.skeleton.layers_path}.{i}."))
            written.add(i)
        plan.metadata["routing_overrides"] = dict(sorted(overrides.items(), key=lambda kv: int(kv[0])))
        inside = {id(p) for layer in self.layers for p in layer.parameters()} | \
            {id(b) for layer in self.layers for b in layer.buffers()}
        writer.write_part({k: v for k, v in self.module.state_dict(keep_vars=True).items() if id(v) not in inside})
        writer.finish()
        self.close()
        if plan.metadata["routing_overrides"]:
            logger.warning("%d layer(s) keep expert counts their grouped router cannot split: routing there falls back "
                           "as recorded in the plan, config and model card.", len(plan.metadata["routing_overrides"]))
        record_layout(self.module, adapter, plan, pruning_config)
        write_config(self.module, folder, self.skeleton.dtype)
        logger.info("Applied plan layer by layer. %s", plan.summary())

    def close(self) -> None:
        """Delete the scratch copies of the converted layers (also done at interpreter exit)."""
        self.skeleton.close()


def apply_clusters_check(model: LayerwiseModel, plan, found) -> None:
    """Refuse a plan that does not fit, before any layer is read (as `apply_clusters` does in memory)."""
    from ..validation import check_plan_fits

    plan.validate()
    check_plan_fits(plan, *found)


class _Verifier:
    """The adapter's check on sample tokens, one loaded layer at a time (`adapters/routing.py`)."""

    def __init__(self, owner: LayerwiseModel, adapter, moe) -> None:
        self.owner, self.adapter, self.moe = owner, adapter, moe
        self.pause = lambda i: contextlib.nullcontext()
        self.captured = capture(owner.module, owner.layers, [sample_ids(owner.module)])
        self.states = self.captured.inputs

    def step(self, i: int) -> None:
        layers = self.owner.layers
        if i not in self.moe:
            self.states = run_layer(layers, i, self.captured, self.states)
            return
        layer = self.moe[i]
        result = {}

        def run():
            result["states"] = run_layer(layers, i, self.captured, self.states)

        with self.pause(i):
            obs = observe(self.owner.module, [layer], run=run)[i]
        self.states = result["states"]
        if learnt(layer) is None:
            verify_layer(self.adapter, layer, obs, self.owner.config)
