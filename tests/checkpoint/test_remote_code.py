"""Loading a pruned checkpoint without optimum-grape (checkpoint/remote_code.py): a non-uniform layout
ships `modeling_grape_pruned.py` and an `auto_map`, checked when written; a uniform one needs none; a
base that ships its own remote code keeps it and the checkpoint says why no file was added. Reloading
every family's checkpoint this way, where optimum_grape cannot be imported, is the family matrix's last
column (tests/coverage/test_matrix.py)."""

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file

from factories import random_token_batches, tiny_model
from optimum_grape import GrapeConfig, GrapePruner
from optimum_grape.checkpoint.remote_code import REMOTE_FILE

SMALL = dict(num_samples=8, sequence_length=32, batch_size=4, max_tokens_per_layer=128)


def prune_and_save(model, folder, **config):
    pruner = GrapePruner(GrapeConfig(**SMALL, **config))
    pruner.prune(model, random_token_batches())
    return pruner.save_pretrained(model, folder), pruner.last_plan


def test_a_non_uniform_checkpoint_loads_where_optimum_grape_cannot_be_imported(tmp_path):
    model = tiny_model("mixtral")
    folder, plan = prune_and_save(model, tmp_path / "pruned", pruning_ratio=0.25, preset="paper")
    assert len(set(plan.experts_per_layer.values())) > 1
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "modeling_grape_pruned.GrapePrunedConfig",
                                  "AutoModelForCausalLM": "modeling_grape_pruned.MixtralForCausalLM"}
    assert config["grape_remote_code"].startswith("written")
    source = (folder / REMOTE_FILE).read_text()
    assert "optimum_grape" not in source.replace("optimum-grape", "")  # self-contained
    ids = torch.arange(24).reshape(2, 12) % 90
    with torch.no_grad():
        expected = model(ids).logits
    code = ("import sys; sys.modules['optimum_grape'] = None\n"
            "import torch; from transformers import AutoModelForCausalLM\n"
            "from safetensors.torch import save_file\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()\n"
            "ids = torch.arange(24).reshape(2, 12) % 90\n"
            "with torch.no_grad(): logits = m(ids).logits\n"
            f"save_file({{'logits': logits.contiguous()}}, {str(tmp_path / 'logits.safetensors')!r})\n"
            "print([l.mlp.experts.num_experts for l in m.model.layers])\n"
            "print(m.config._experts_implementation)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    counts, experts_implementation = result.stdout.strip().splitlines()
    assert counts == str(list(plan.experts_per_layer.values()))
    assert experts_implementation == model.config._experts_implementation  # the kernels a plain load runs
    assert "Unknown quantization type" not in result.stderr
    assert torch.equal(load_file(tmp_path / "logits.safetensors")["logits"], expected)


def test_the_card_says_how_to_load_it_each_way(tmp_path):
    folder, _ = prune_and_save(tiny_model("mixtral"), tmp_path / "pruned", pruning_ratio=0.25, preset="paper")
    card = (folder / "README.md").read_text()
    assert "import optimum_grape" in card and "trust_remote_code=True" in card
    assert "runs Python code from this checkpoint" in card


def test_a_uniform_checkpoint_needs_no_remote_code(tmp_path):
    folder, _ = prune_and_save(tiny_model("mixtral"), tmp_path / "pruned", pruning_ratio=0.25, allocation="uniform")
    config = json.loads((folder / "config.json").read_text())
    assert "auto_map" not in config and not (folder / REMOTE_FILE).exists()
    assert config["grape_remote_code"].startswith("not needed")


def test_a_base_with_its_own_remote_code_keeps_it_and_says_why(tmp_path):
    model = tiny_model("modulelist")
    folder, plan = prune_and_save(model, tmp_path / "pruned", pruning_ratio=0.25, preset="paper")
    config = json.loads((folder / "config.json").read_text())
    assert len(set(plan.experts_per_layer.values())) > 1
    assert REMOTE_FILE[:-3] not in json.dumps(config.get("auto_map")) and config["auto_map"]  # the base's own
    assert config["grape_remote_code"].startswith("not written: the base model already ships remote code")
    assert "no modeling file ships with it" in (folder / "README.md").read_text()
