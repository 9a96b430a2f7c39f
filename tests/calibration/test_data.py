"""Calibration data (calibration/data.py): text with a tokenizer, a `datasets` object, a saved
dataset folder and a text file give the same tokens; empty, untokenizable, missing or non-data
input is refused with the reason, and a tiny calibration warns."""

import logging

import pytest
import torch

from factories import tiny_model
from optimum_grape import CalibrationDataError, GrapeConfig, GrapePruner


def small_config(**kwargs):
    defaults = dict(num_samples=8, sequence_length=32, batch_size=4, max_tokens_per_layer=128)
    defaults.update(kwargs)
    return GrapeConfig(**defaults)


def pruner(**kwargs):
    return GrapePruner(GrapeConfig(num_samples=4, sequence_length=16, **kwargs))


def test_text_calibration_with_a_real_tokenizer(tokenizer):
    model = tiny_model("mixtral")
    texts = ["The Congress shall have power to lay and collect taxes.", "In the beginning was the Word.",
             "Return a new sorted list from the items in iterable."] * 10
    stats = GrapePruner(small_config(pruning_ratio=0.25)).calibrate(model, texts, tokenizer=tokenizer)
    assert stats.metadata["num_tokens"] > 0


def test_calibration_from_a_datasets_object_and_a_saved_folder(tmp_path, tokenizer):
    import datasets

    texts = ["Fellow-Citizens of the Senate and House of Representatives.", "In the beginning God created.",
             "The sorted() function returns a new list."] * 8
    ds = datasets.Dataset.from_dict({"text": texts})
    model = tiny_model("mixtral")
    direct = GrapePruner(small_config(pruning_ratio=0.25)).calibrate(model, ds, tokenizer=tokenizer)
    ds.save_to_disk(str(tmp_path / "calib"))
    from_folder = GrapePruner(small_config(pruning_ratio=0.25, dataset=str(tmp_path / "calib"))).calibrate(
        model, None, tokenizer=tokenizer)
    assert direct.metadata["num_tokens"] == from_folder.metadata["num_tokens"] > 0
    assert torch.equal(direct.layers[0].tokens, from_folder.layers[0].tokens)
    (tmp_path / "calib.txt").write_text("\n\n".join(texts))
    from_file = GrapePruner(small_config(pruning_ratio=0.25, dataset=str(tmp_path / "calib.txt"))).calibrate(
        model, None, tokenizer=tokenizer)
    assert from_file.metadata["num_tokens"] == direct.metadata["num_tokens"]


def test_dataset_without_a_text_column_is_refused(tokenizer):
    import datasets

    from optimum_grape import CalibrationDataError

    ds = datasets.Dataset.from_dict({"content": ["a", "b"]})
    with pytest.raises(CalibrationDataError, match="needs a 'text' column"):
        GrapePruner(small_config(pruning_ratio=0.25)).calibrate(tiny_model("mixtral"), ds, tokenizer=tokenizer)


def test_empty_calibration_data():
    with pytest.raises(CalibrationDataError, match="empty"):
        pruner(pruning_ratio=0.25).calibrate(tiny_model("mixtral"), [])


def test_strings_without_a_tokenizer():
    with pytest.raises(CalibrationDataError, match="no tokenizer"):
        pruner(pruning_ratio=0.25).calibrate(tiny_model("mixtral"), ["some text"])


def test_missing_dataset_path():
    with pytest.raises(CalibrationDataError, match="neither a text file"):
        pruner(pruning_ratio=0.25, dataset="/nonexistent/calib.txt").calibrate(tiny_model("mixtral"))


def test_non_data_passed_to_calibrate_is_named():
    with pytest.raises(CalibrationDataError, match=r"Calibration data=123 \(int\) is not calibration data"):
        GrapePruner(pruning_ratio=0.25).calibrate(tiny_model("mixtral"), 123)


def test_a_tiny_calibration_warns(caplog):
    pruner = GrapePruner(GrapeConfig(pruning_ratio=0.25, selection_samples=0))
    with caplog.at_level(logging.WARNING, logger="optimum_grape"):
        pruner.calibrate(tiny_model("mixtral"), [torch.arange(4)])
    assert "Calibration has only 4 tokens" in caplog.text
