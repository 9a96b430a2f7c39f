"""Running the decoder for its inside (calibration/stream.py): the head is skipped where the model
allows it, and nothing the recorder sees changes."""

import torch
from torch import nn

from factories import random_token_batches, tiny_model
from optimum_grape import GrapeConfig, GrapePruner
from optimum_grape.calibration.stream import forward_for_states


def test_forward_for_states_computes_the_head_on_the_last_position_only():
    model = tiny_model("qwen3_moe")
    batch = torch.stack(random_token_batches(n=2, length=16))
    with torch.no_grad():
        full = model(input_ids=batch, use_cache=False).logits
        last = forward_for_states(model, batch).logits
    assert last.shape == (batch.shape[0], 1, full.shape[-1])
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_forward_for_states_runs_a_model_without_logits_to_keep():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)

        def forward(self, input_ids, use_cache=None):
            return self.embed(input_ids)

    assert forward_for_states(Plain(), torch.zeros(1, 3, dtype=torch.long)).shape == (1, 3, 4)


def test_calibration_without_the_full_head_records_the_same_statistics(monkeypatch):
    """The head is not part of what calibration measures: statistics recorded with the head over every
    position (the model's plain forward) and over the last position only are equal to the bit."""
    model = tiny_model("mixtral")
    batches = random_token_batches()
    config = GrapeConfig(pruning_ratio=0.25, num_samples=8, sequence_length=32, batch_size=4, max_tokens_per_layer=128)
    cheap = GrapePruner(config).calibrate(model, batches)
    monkeypatch.setattr("optimum_grape.pruner.forward_for_states",
                        lambda m, ids: m(input_ids=ids, use_cache=False))
    full = GrapePruner(config).calibrate(model, batches)
    for index, layer in cheap.layers.items():
        for name in ("tokens", "weight_mass", "saliency", "max_output", "similarity"):
            assert torch.equal(getattr(layer, name), getattr(full.layers[index], name)), (index, name)
