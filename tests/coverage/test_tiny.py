"""Tiny models from a family's own config class (coverage/tiny.py): lists naming layers are
renumbered to the layers kept."""


def test_lists_naming_layers_are_renumbered_to_the_kept_layers():
    from optimum_grape.coverage.tiny import shrink_dict

    types = ["sliding"] * 4 + ["indexed"] + ["sliding"] * 5
    sources = list(range(10))
    sources[7] = 4  # layer 7 reads the K/V of layer 4
    out = shrink_dict({"num_hidden_layers": 10, "layer_types": types, "kv_source_layers": sources,
                       "index_layers": [4], "mlp_only_layers": [0, 1]}, {})
    # kept: the first of each layer type (0 and 4), then the last layers (8, 9)
    assert out["num_hidden_layers"] == 4 and out["layer_types"] == ["sliding", "indexed", "sliding", "sliding"]
    assert out["kv_source_layers"] == [0, 1, 2, 3] and out["index_layers"] == [1] and out["mlp_only_layers"] == [0]
