"""Running a decoder one layer at a time on cached hidden states (what optimum's GPTQ and
llm-compressor's sequential pipeline do): capture what the model feeds each decoder layer, then run
any layer on any states, and turn final states into logits with the model's own head.

`Captured` holds, per batch, the input of the first decoder layer and the arguments the model passes
every layer (attention mask, position embeddings, ...). They are taken from the model's own forward,
with every decoder layer replaced by a stand-in that records its arguments and hands its input on,
so only the embeddings run. `head_logits` runs that forward again with the last stand-in returning
given final states: the model's norm, head and any logit scaling then run as in a full forward.
A layer run on the same input with the same arguments computes what it computes inside the full
forward, so a streamed pass gives the full forward's values.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from ..adapters.fused import decoder_of
from ..errors import UnsupportedModelError


def forward_for_states(model: nn.Module, input_ids: torch.Tensor):
    """The model's forward on `input_ids` run for what happens inside its decoder (recording, capture),
    not for its logits: the head computes the last position only (`logits_to_keep=1`, where the
    model's forward takes it, as transformers' causal LMs do). A 32k-vocabulary head over every
    token is a third of a small MoE's forward (Qwen3-MoE shaped, hidden 512), and calibration never
    reads those logits."""
    kwargs = {"use_cache": False}
    if "logits_to_keep" in _forward_parameters(type(model)):
        kwargs["logits_to_keep"] = 1
    return model(input_ids=input_ids, **kwargs)


@functools.cache
def _forward_parameters(cls) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


@dataclass
class Captured:
    batches: list[torch.Tensor]  # input ids per batch
    inputs: list[torch.Tensor] = field(default_factory=list)  # per batch: hidden states entering the first layer
    calls: list[dict[int, tuple[tuple, dict]]] = field(default_factory=list)  # per batch: layer -> (args[1:], kwargs)
    order: list[int] = field(default_factory=list)  # decoder layers in the order the model runs them


@contextlib.contextmanager
def stand_ins(layers: nn.ModuleList, on_call):
    """Replace every decoder layer's forward by `on_call(index, args, kwargs)` for the block."""
    originals = {}
    try:
        for i, layer in enumerate(layers):
            originals[i] = layer.__dict__.get("forward")

            def forward(*args, _i=i, **kwargs):
                return on_call(_i, args, kwargs)

            layer.forward = forward
        yield
    finally:
        for i, layer in enumerate(layers):
            if originals.get(i) is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = originals[i]


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class _Stop(Exception):
    pass


@torch.no_grad()
def capture(model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor]) -> Captured:
    """Per batch, the first layer's input and every layer's arguments (only the embeddings need weights)."""
    device = model.get_input_embeddings().weight.device
    out = Captured(batches=batches)
    for b, batch in enumerate(batches):
        calls: dict[int, tuple[tuple, dict]] = {}
        order: list[int] = []

        def on_call(i, args, kwargs):
            if i in calls:
                raise UnsupportedModelError(
                    f"{type(model).__name__} runs decoder layer {i} more than once per forward; layer-by-layer mode "
                    "needs each layer to run once. Prune it in memory (without --layer-by-layer).")
            hidden = _hidden(args, kwargs)
            if not order:
                out.inputs.append(hidden)
            calls[i] = (tuple(args[1:]), {k: v for k, v in kwargs.items() if k != "hidden_states"})
            order.append(i)
            return hidden

        with stand_ins(layers, on_call):
            try:
                forward_for_states(model, batch.to(device))
            except (TypeError, ValueError, AttributeError, IndexError, RuntimeError) as err:
                # e.g. a decoder layer returning (states, routing) that the model unpacks (glm5_next):
                # a stand-in handing on the states alone breaks the forward.
                raise UnsupportedModelError(
                    f"{type(model).__name__}'s forward fails when its decoder layers are run one at a time "
                    f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); layer-by-layer mode "
                    "cannot run it. Prune it in memory (without --layer-by-layer).") from None
        if b == 0:
            out.order = order
        elif order != out.order:
            raise UnsupportedModelError(f"{type(model).__name__} runs its decoder layers in a different order from one "
                                        "batch to the next; layer-by-layer mode cannot follow it.")
        out.calls.append(calls)
    if not out.order:
        raise UnsupportedModelError(f"{type(model).__name__}'s forward did not run its decoder layers.")
    return out


def _as_hidden(output, like: torch.Tensor, index: int) -> torch.Tensor:
    if isinstance(output, torch.Tensor) and output.shape == like.shape:
        return output
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor) and output[0].shape == like.shape:
        return output[0]
    raise UnsupportedModelError(f"Decoder layer {index} returned {type(output).__name__}, not the hidden states; "
                                "layer-by-layer mode cannot chain it. Prune it in memory (without --layer-by-layer).")


@torch.no_grad()
def run_layer(layers: nn.ModuleList, index: int, captured: Captured, states: list[torch.Tensor],
              before=None) -> list[torch.Tensor]:
    """The layer's output for each batch's `states`, with the arguments the model gives it
    (`before(b)` is called before batch b runs)."""
    layer = layers[index]
    out = []
    for b, hidden in enumerate(states):
        if before is not None:
            before(b)
        args, kwargs = captured.calls[b][index]
        out.append(_as_hidden(layer(hidden, *args, **kwargs), hidden, index))
    return out


@torch.no_grad()
def head_logits(model: nn.Module, layers: nn.ModuleList, captured: Captured, b: int, final: torch.Tensor
                ) -> torch.Tensor:
    """Logits of batch `b` whose last decoder layer produced `final`, through the model's own head."""
    last = captured.order[-1]

    def on_call(i, args, kwargs):
        return final if i == last else _hidden(args, kwargs)

    device = model.get_input_embeddings().weight.device
    with stand_ins(layers, on_call):
        return model(input_ids=captured.batches[b].to(device), use_cache=False).logits


@torch.no_grad()
def experts_inputs(layers: nn.ModuleList, index: int, experts: nn.Module, captured: Captured,
                   states: list[torch.Tensor]) -> list[tuple]:
    """The (args, kwargs) the layer's experts module receives on each batch; the layer stops there."""
    calls = []

    def hook(module, args, kwargs):
        calls.append((args, kwargs))
        raise _Stop

    handle = experts.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b, hidden in enumerate(states):
            args, kwargs = captured.calls[b][index]
            try:
                layers[index](hidden, *args, **kwargs)
            except _Stop:
                pass
    finally:
        handle.remove()
    return calls


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(module path, list) of the text decoder's layers: what layer-by-layer mode loads one at a time."""
    path, decoder = decoder_of(model)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UnsupportedModelError(
            f"{type(model).__name__}: running the decoder one layer at a time needs its `layers`, and "
            f"{type(decoder).__name__} has no `layers` list. Prune it in memory (without --layer-by-layer).")
    return (f"{path}.layers" if path else "layers"), layers


@torch.no_grad()
def check_streams_like_forward(model: nn.Module, layers: nn.ModuleList, batch: torch.Tensor) -> None:
    """Refuse (UnsupportedModelError) a model whose layer-by-layer run does not give its forward's logits
    on `batch`: one that passes more than the hidden states from layer to layer (a shared routing
    state, mixed residual streams) would otherwise be scored or merged on wrong states, silently."""
    captured = capture(model, layers, [batch])
    states = captured.inputs
    for i in captured.order:
        states = run_layer(layers, i, captured, states)
    device = model.get_input_embeddings().weight.device
    streamed = head_logits(model, layers, captured, 0, states[0]).float()
    full = model(input_ids=batch.to(device), use_cache=False).logits.float()
    if streamed.shape != full.shape or not torch.allclose(streamed, full, rtol=1e-4, atol=1e-5):
        raise UnsupportedModelError(f"{type(model).__name__} run one decoder layer at a time does not reproduce its "
                                    "forward; layer-by-layer mode cannot run it. Prune it in memory (without "
                                    "--layer-by-layer).")
