"""A tiny remote-code MoE (tests/fixtures/remote_moe) loaded the way users load one: a folder with
`auto_map` in config.json and `trust_remote_code=True`. Exercises the structural ModuleList adapter."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "fixtures" / "remote_moe"


def remote_moe_folder(layers: int, experts: int) -> Path:
    folder = Path(tempfile.gettempdir()) / f"optimum_grape_tiny_moe_{layers}x{experts}"
    folder.mkdir(exist_ok=True)
    for source in SOURCE.glob("*.py"):
        shutil.copy(source, folder / source.name)
    config = dict(model_type="tiny_moe", architectures=["TinyMoeForCausalLM"], vocab_size=96, hidden_size=32,
                  intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, num_local_experts=experts, num_experts_per_tok=2,
                  auto_map={"AutoConfig": "configuration_tiny_moe.TinyMoeConfig",
                            "AutoModelForCausalLM": "modeling_tiny_moe.TinyMoeForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def tiny_remote_moe(layers: int = 4, experts: int = 8, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    from factories import scale_like_trained

    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(remote_moe_folder(layers, experts), trust_remote_code=True)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=True).eval()
    scale_like_trained(model, seed)
    return model
