"""Loading a checkpoint one part at a time (layerwise/skeleton.py): at most one decoder layer is in
memory, and a released layer is back on the meta device."""

from optimum_grape import GrapeConfig, GrapePruner
from optimum_grape.layerwise.skeleton import Skeleton


SMALL = dict(pruning_ratio=0.25, num_samples=4, sequence_length=16, batch_size=2, max_tokens_per_layer=64,
             selection_samples=2)


def test_at_most_one_decoder_layer_is_in_memory(base_folder, tmp_path, monkeypatch):
    loaded, most = set(), [0]
    load, release = Skeleton.load, Skeleton.release

    def counting_load(self, group):
        load(self, group)
        if group is not None:
            loaded.add(group)
            most[0] = max(most[0], len(loaded))

    def counting_release(self, group):
        release(self, group)
        loaded.discard(group)
        assert all(p.is_meta for p in self.layers[group].parameters())

    monkeypatch.setattr(Skeleton, "load", counting_load)
    monkeypatch.setattr(Skeleton, "release", counting_release)
    GrapePruner(GrapeConfig(**SMALL, layer_by_layer=True)).prune_checkpoint(base_folder, tmp_path / "out")
    assert most[0] == 1 and not loaded
