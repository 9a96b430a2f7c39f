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
    pruner = GrapePruner(GrapeConfig(pruning_ratio=0.25, selection_samples=0, sequence_length=64))
    with caplog.at_level(logging.WARNING, logger="optimum_grape"):
        pruner.calibrate(tiny_model("mixtral"), [torch.arange(4)])
    assert "Calibration has only 4 tokens" in caplog.text


# -- sampling: documents in a seeded random order, held-aside windows from unused documents ---------
DOMAINS = {"bible": "And the king said unto them, Go ye into the land and possess it.",
           "python": "Return a new sorted list from the items in iterable; key specifies a function.",
           "sotu": "The Congress and the President shall work together for the people of the nation."}


def test_windows_cover_every_domain_of_a_file_ordered_by_domain(tmp_path, tokenizer):
    """A calibration file holding 40 documents of one domain, then 40 of the next: the first windows of
    the token stream would all be `bible`; the sampled ones cover every domain, for any seed."""
    from optimum_grape.calibration.data import load_calibration_data, sample_windows

    path = tmp_path / "ordered.txt"
    path.write_text("\n\n".join(text for text in DOMAINS.values() for _ in range(40)) + "\n", encoding="utf-8")
    data = load_calibration_data(str(path))
    for seed in (0, 1, 2):
        sample = sample_windows(data, tokenizer, sequence_length=32, num_samples=32, held_aside=0, seed=seed)
        text = tokenizer.decode(sample.windows.flatten().tolist()).replace(" ", "").replace("Ġ", "")
        assert all(marker in text for marker in ("king", "sorted", "Congress")), (seed, text[:200])
        assert sample.documents_used < sample.documents_total  # only what calibration uses is tokenized
    stream = sample_windows(data, tokenizer, 32, 8, 0, seed=0).windows
    assert not torch.equal(stream, sample_windows(data, tokenizer, 32, 8, 0, seed=1).windows)


def test_held_aside_windows_come_from_documents_calibration_did_not_use():
    from optimum_grape.calibration.data import sample_windows

    documents = [torch.full((20,), i) for i in range(100)]  # document i is the token id i, 20 times
    sample = sample_windows(documents, None, sequence_length=16, num_samples=10, held_aside=6, seed=0)
    calibration_docs = set(sample.windows.unique().tolist())
    aside_docs = set(sample.held_aside.unique().tolist())
    assert sample.windows.shape == (10, 16) and sample.held_aside.shape == (6, 16)
    assert sample.held_aside_unseen and not calibration_docs & aside_docs
    assert sample.documents_used < 100


def test_too_little_data_holds_calibration_windows_aside_and_warns(caplog):
    documents = [torch.full((20,), i) for i in range(5)]
    pruner = GrapePruner(GrapeConfig(pruning_ratio=0.25, num_samples=8, sequence_length=16, selection_samples=2))
    with caplog.at_level(logging.WARNING, logger="optimum_grape"):
        pruner.prepare_data(documents)
    assert pruner.selection_overlaps and len(pruner.selection_batches) == 1
    assert "windows that score candidate plans are calibration windows" in caplog.text
    assert pruner.sampling["held_aside_unseen"] is False and pruner.sampling["documents_total"] == 5


def test_a_large_dataset_is_read_only_as_far_as_calibration_needs(tokenizer):
    import datasets

    from optimum_grape.calibration.data import sample_windows

    big = datasets.Dataset.from_dict({"text": [f"Document number {i} says something about item {i}." for i in
                                               range(20000)]})
    sample = sample_windows(big, tokenizer, sequence_length=32, num_samples=4, held_aside=2, seed=0)
    assert sample.windows.shape == (4, 32) and sample.held_aside_unseen
    assert sample.documents_used < 100 and sample.documents_total == 20000


def test_one_huge_document_is_tokenised_only_as_far_as_calibration_needs(tmp_path, tokenizer):
    # issue 25: a 50 MB file without a blank line was tokenised whole (9.6 GB peak) to use 16k tokens
    from optimum_grape.calibration.data import read_text_documents, sample_windows

    words = " ".join(f"word{i % 997} says item{i % 13}" for i in range(400_000))  # about 9 MB, one document
    (tmp_path / "huge.txt").write_text(words)
    documents = read_text_documents(tmp_path / "huge.txt")
    seen = []

    class Spy:  # the real tokenizer, recording how much text it is given
        eos_token_id = tokenizer.eos_token_id

        def __call__(self, text, **kwargs):
            seen.append(len(text))
            return tokenizer(text, **kwargs)

    sample = sample_windows(documents, Spy(), sequence_length=64, num_samples=8)
    assert len(documents) == 1 and sample.windows.shape == (8, 64)
    assert sum(seen) < 64 * 8 * 100 and max(seen) < len(words) / 100
    whole = tokenizer(words[:20000], add_special_tokens=False)["input_ids"]
    assert sample.windows.flatten().tolist() == whole[:8 * 64]  # the same tokens as tokenising it all


def test_degenerate_calibration_text_warns(tmp_path, tokenizer, caplog):
    # issue 25: a file of one repeated character was used without a word
    (tmp_path / "same.txt").write_text("a " * 20000)
    pruner = GrapePruner(GrapeConfig(pruning_ratio=0.25, dataset=str(tmp_path / "same.txt"), num_samples=8,
                                     sequence_length=64, selection_samples=0))
    with caplog.at_level(logging.WARNING, logger="optimum_grape"):
        pruner.prepare_data(tokenizer=tokenizer)
    assert "Calibration data is degenerate" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="optimum_grape"):
        GrapePruner(GrapeConfig(pruning_ratio=0.25, num_samples=8, sequence_length=64)).prepare_data(
            tokenizer=tokenizer)
    assert "degenerate" not in caplog.text  # the shipped text
