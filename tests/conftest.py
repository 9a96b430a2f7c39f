import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One intra-op thread, here and in the fresh-process subprocesses (they inherit the environment):
# the tiny test models gain nothing from more, and with a second thread on a busy 2-core machine a
# forward pass measured 2.2 s instead of 0.012 s (OpenMP threads spinning against other processes).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Reproducible MKL (conditional numerical reproducibility, read when MKL first runs): without it, on
# an AVX-512 CPU MKL's float32 matmuls change in the last bit with the memory alignment of their
# operands, and a layer loaded from disk by the layer-by-layer path sits at other addresses than the
# in-memory model's (tests/layerwise/test_model.py[qwen3_vl_moe] then differed by 1e-6 from layer 2
# on). The tests compare the two paths bit for bit, so they pin the code path MKL takes.
os.environ.setdefault("MKL_CBWR", "AVX2")

import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A real BPE tokenizer trained in a second on the shipped calibration text (vocab fits the tiny models)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from optimum_grape.calibration.data import default_calibration_path

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=96, special_tokens=["<unk>", "</s>"], show_progress=False,
                                  initial_alphabet=[])
    text = default_calibration_path().read_text(encoding="utf-8")[:200_000]
    tok.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


@pytest.fixture(scope="session")
def base_folder(tmp_path_factory, tokenizer):
    """A saved tiny Mixtral (4 layers x 8 experts, top-2) with a tokenizer: a CLI's BASE. Read only."""
    from factories import tiny_model

    folder = tmp_path_factory.mktemp("base") / "tiny-mixtral"
    tiny_model("mixtral").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def ws(tmp_path, base_folder):
    """A private copy of the base model at tmp_path/ws/base, for tests that watch it for damage."""
    base = tmp_path / "ws" / "base"
    shutil.copytree(base_folder, base)
    return base


@pytest.fixture(scope="module")
def planned(base_folder, tmp_path_factory):
    """A valid plan (as JSON data) and statistics file for the model in `base_folder`."""
    from transformers import AutoModelForCausalLM

    from factories import random_token_batches
    from optimum_grape import GrapeConfig, GrapePruner

    model = AutoModelForCausalLM.from_pretrained(base_folder)
    pruner = GrapePruner(GrapeConfig(pruning_ratio=0.25, num_samples=8, sequence_length=32, selection_samples=0))
    stats = pruner.calibrate(model, random_token_batches())
    path = tmp_path_factory.mktemp("planned") / "stats.safetensors"
    stats.save(path)
    return {"plan": pruner.plan(stats).to_dict(), "stats": path}


@pytest.fixture(scope="module")
def pruned_cli(base_folder, tmp_path_factory):
    """One CLI prune with --evaluate, shared by the tests of a module that read its output."""
    from helpers import run_cli

    tmp_path = tmp_path_factory.mktemp("cli")
    out = tmp_path / "pruned"
    result = run_cli("prune", base_folder, "--output", out, "--ratio", "0.25", "--num-samples", "8",
                     "--sequence-length", "32", "--evaluate", "--eval-tokens", "256", "--save-stats",
                     tmp_path / "stats.safetensors", "--base-model", "example-org/tiny-mixtral")
    assert result.returncode == 0, result.stderr[-2000:]
    return out, result
