"""Test helpers: the CLI and logits from a checkpoint, each in a fresh Python process; the CLI in this
process, and the checks that bad input (issue 12) changed nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PROBE = torch.arange(2 * 12).reshape(2, 12) % 90


def run_cli(*args, timeout=300, env=None) -> subprocess.CompletedProcess:
    """`python -m optimum_grape ARGS` as a user runs it (`env`: extra environment variables)."""
    return subprocess.run([sys.executable, "-m", "optimum_grape", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def logits_in_fresh_process(folder: Path, use_plugin: bool = True) -> torch.Tensor:
    """Load `folder` in a new interpreter (optionally without importing optimum_grape) and return
    its logits on PROBE."""
    folder = Path(folder)
    probe_file, out_file = folder.parent / "probe.safetensors", folder.parent / "logits.safetensors"
    save_file({"ids": PROBE.contiguous()}, str(probe_file))
    code = textwrap.dedent(f"""
        import torch
        {'import optimum_grape' if use_plugin else ''}
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}).eval()
        ids = load_file({str(probe_file)!r})["ids"]
        with torch.no_grad():
            save_file({{"logits": model(ids).logits.contiguous()}}, {str(out_file)!r})
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise AssertionError(f"fresh-process load failed:\n{result.stderr[-3000:]}")
    return load_file(str(out_file))["logits"]


def logits_of_many_in_one_process(folders: list[Path]) -> list[torch.Tensor]:
    """Like logits_in_fresh_process for many checkpoints, paying for one interpreter start only."""
    folders = [Path(f) for f in folders]
    work = folders[0].parent
    probe_file, out_file = work / "probe.safetensors", work / "many_logits.safetensors"
    save_file({"ids": PROBE.contiguous()}, str(probe_file))
    code = textwrap.dedent(f"""
        import torch, optimum_grape
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM
        ids = load_file({str(probe_file)!r})["ids"]
        out = {{}}
        for i, folder in enumerate({[str(f) for f in folders]!r}):
            model = AutoModelForCausalLM.from_pretrained(folder).eval()
            with torch.no_grad():
                out[str(i)] = model(ids).logits.contiguous()
        save_file(out, {str(out_file)!r})
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"fresh-process load failed:\n{result.stderr[-3000:]}")
    loaded = load_file(str(out_file))
    return [loaded[str(i)] for i in range(len(folders))]


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(PROBE).logits


def cli_prune(capsys, *args) -> tuple[int, str]:
    """`optimum-grape prune ARGS` in this process (`cli.main`, what `python -m optimum_grape` calls):
    its exit status and what it wrote to stderr."""
    from optimum_grape.cli import main

    code = main(["prune", *map(str, args)])
    return code, capsys.readouterr().err


def write_json(path, data):
    path.write_text(json.dumps(data))
    return path


def model_unchanged(model, state, counts) -> bool:
    """`model` holds `state`, its MoE layers have `counts` experts, and its config no pruned layout."""
    from optimum_grape.adapters import find_moe_layers

    return (all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
            and [l.experts.num_experts for l in find_moe_layers(model)[1]] == counts
            and getattr(model.config, "quantization_config", None) is None)
