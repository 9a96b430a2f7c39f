"""The family coverage matrix: every MoE modeling file of the installed transformers, built tiny from
its own config class with random weights, through the same checks.

Per family, in this process: the pruner's checks (adapter found and verified on sample tokens, or
refused with the reason: this is before calibration); a keep-all plan must leave the logits
bit-exactly unchanged; a 25% GRAPE prune (calibrated on random tokens) must give the planned count in
every layer and leave every tensor outside the pruned experts, routers and per-expert vectors equal
(shared experts, dense layers, attention, vision towers); then `save_pretrained`. Then ONE fresh
Python process reloads every saved checkpoint (`reload_all`) and its logits must equal the pruned
model's exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import UnsupportedModelError
from .discover import fused_modules, main_model_type, model_class_for
from .tiny import build_tiny, scale_like_trained

RELOAD_ATOL = 1e-5  # float32 logits; in practice 0 or a few ulps (a kernel may pick another summation order)
PROBE = torch.arange(2 * 12).reshape(2, 12) % 90  # ordinary ids in every tiny vocabulary (specials sit above 90)


@dataclass
class FamilyResult:
    module: str  # transformers/models/<module>
    model_type: str = ""
    model_class: str = ""
    # "supported", "refused" (UnsupportedModelError before calibration), "unbuilt" (the tiny test
    # instance could not be built: not counted as supported) or "failed"
    status: str = "failed"
    reason: str = ""
    adapter: str = ""
    routing: str = ""
    kept_whole: str = ""
    experts_before: dict = field(default_factory=dict)
    experts_after: dict = field(default_factory=dict)
    checks: dict = field(default_factory=dict)
    reload_max_diff: float | None = None  # 0.0: bit-identical logits after the fresh-process reload
    # Reloaded with trust_remote_code=True where optimum_grape cannot be imported: "exact", "not needed"
    # (uniform counts), or why not (the checkpoint's `grape_remote_code`, or the failure).
    remote_code: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _small_pruner():
    from .. import GrapeConfig, GrapePruner

    return GrapePruner(GrapeConfig(pruning_ratio=0.25, num_samples=4, sequence_length=16, batch_size=4,
                                   max_tokens_per_layer=64))


@torch.no_grad()
def logits_of(model) -> torch.Tensor:
    torch.manual_seed(0)  # a diffusion LM draws its own noise tokens
    return model(input_ids=PROBE).logits.float()


def _calibration_batches(model) -> list[torch.Tensor]:
    from ..adapters.routing import sample_ids

    return [sample_ids(model, 16, seed=1 + i)[0] for i in range(4)]


def _pruned_names(adapter, layers) -> list[str]:
    """State-dict prefixes / names the prune may change: experts, routers, the blocks' per-expert vectors."""
    names = []
    for layer in layers:
        names += [f"{layer.name}.{child}." for child, module in layer.block.named_children()
                  if module is layer.experts or module is layer.router]
        names += [f"{layer.name}.{name}" for owner, name, _ in adapter.routing_tensors(layer) if owner is layer.block]
    return names


def kept_whole(model, layers) -> str:
    """What the prune leaves alone, in words: dense decoder layers, shared experts, other experts, towers."""
    from ..adapters.fused import decoder_of, is_fused_experts, text_config

    parts = []
    total = getattr(text_config(model.config), "num_hidden_layers", None)
    if isinstance(total, int) and total > len(layers):
        parts.append(f"{total - len(layers)} of {total} decoder layers without routed experts")
    shared = sorted({name for layer in layers for name, child in layer.block.named_children()
                     if "shared" in name and any(True for _ in child.parameters())})
    if shared:
        parts.append("shared experts (" + ", ".join(shared) + ")")
    pruned = {id(layer.experts) for layer in layers}
    other = [n for n, m in model.named_modules() if is_fused_experts(m) and id(m) not in pruned]
    if other:
        parts.append(f"{len(other)} other experts module(s) such as {other[0]}")
    prefix, _ = decoder_of(model)
    parent = model.get_submodule(prefix.rpartition(".")[0]) if "." in prefix else None  # a multimodal model's
    towers = [n for n, c in (parent.named_children() if parent is not None else ())
              if n != prefix.rpartition(".")[2] and any(True for _ in c.parameters())]
    if towers:
        parts.append(", ".join(towers))
    return "; ".join(parts)


def _describe_adapter(adapter, model_type: str) -> str:
    from ..adapters import FAMILIES

    name = "generic" if type(adapter).__name__ == "FusedExpertsAdapter" else type(adapter).__name__
    return f"registered: {name}" if model_type in FAMILIES else f"found by structure: {name}"


def prune_family(module: str, folder: Path) -> tuple[FamilyResult, torch.Tensor | None]:
    """Stage 1 of a family (this process); returns the result so far and the pruned model's logits."""
    from ..adapters import find_moe_layers
    from ..adapters.routing import describe, learnt
    from ..plan import PruningPlan

    start = time.perf_counter()
    result = FamilyResult(module)
    result.model_type = main_model_type(module) or module
    model_class = model_class_for(result.model_type) if main_model_type(module) else None
    if model_class is None:
        result.status = "refused"
        result.reason = ("no language-model class (causal LM, multimodal LM, token classification or seq2seq) in "
                         "transformers' auto mappings: not a model optimum-grape prunes")
        return result, None
    result.model_class = model_class.__name__
    try:
        model = build_tiny(result.model_type, model_class)
    except Exception as error:  # noqa: BLE001 -- config validators raise anything; the row says what
        # A release can add a family whose defaults the shrinking rules break: that is the test
        # fixture's limit (coverage/tiny.py needs an override), not evidence about pruning it.
        result.status = "unbuilt"
        result.reason = (f"no tiny instance could be built from its config class ({type(error).__name__}: "
                         f"{str(error).strip().splitlines()[-1] if str(error).strip() else ''}); "
                         "optimum_grape/coverage/tiny.py needs an override for it")
        result.seconds = time.perf_counter() - start
        return result, None
    pruner = _small_pruner()
    try:
        scale_like_trained(model)
        pruner.check(model)  # finds the adapter, verifies it on sample tokens, checks the budget
    except UnsupportedModelError as error:
        result.status, result.reason = "refused", str(error)
        result.seconds = time.perf_counter() - start
        return result, None
    adapter, layers = find_moe_layers(model)
    result.adapter = _describe_adapter(adapter, result.model_type)
    result.routing = describe(learnt(layers[0])) if learnt(layers[0]) else "not verified"
    result.experts_before = {layer.index: layer.num_experts for layer in layers}
    result.kept_whole = kept_whole(model, layers)

    before = logits_of(model)
    keep_all = PruningPlan(clusters={l.index: [[e] for e in range(l.num_experts)] for l in layers},
                           num_experts_before=dict(result.experts_before))
    pruner.apply(model, keep_all)
    result.checks["identity"] = bool(torch.equal(logits_of(model), before))

    state = {k: v.clone() for k, v in model.state_dict().items()}
    changeable = tuple(_pruned_names(adapter, layers))
    plan = pruner.plan(pruner.calibrate(model, _calibration_batches(model)))
    pruner.apply(model, plan)
    layers = find_moe_layers(model)[1]
    result.experts_after = {layer.index: layer.num_experts for layer in layers}
    result.checks["counts"] = result.experts_after == plan.experts_per_layer and all(
        layer.experts.down_proj.shape[0] == layer.num_experts for layer in layers)
    after = model.state_dict()
    outside = [k for k in state if not k.startswith(changeable) and k not in changeable]
    result.checks["untouched"] = all(k in after and torch.equal(after[k], state[k]) for k in outside)
    expected = logits_of(model)
    pruner.save_pretrained(model, folder)
    result.seconds = time.perf_counter() - start
    return result, expected


RELOAD = """
import sys
if {remote!r}:
    sys.modules["optimum_grape"] = None  # where optimum-grape is not installed: the checkpoint's own code
import torch, transformers
if not {remote!r}:
    import optimum_grape
from safetensors.torch import load_file, save_file
jobs, probe_file, out_file = {jobs!r}, {probe!r}, {out!r}
ids, out, errors = load_file(probe_file)["ids"], {{}}, {{}}
for name, folder, class_name in jobs:
    try:
        if {remote!r}:
            auto = [k for k in __import__("json").load(open(folder + "/config.json"))["auto_map"] if k != "AutoConfig"][0]
            model = getattr(transformers, auto).from_pretrained(folder, trust_remote_code=True).eval()
        else:
            model = getattr(transformers, class_name).from_pretrained(folder).eval()
        torch.manual_seed(0)
        with torch.no_grad():
            out[name] = model(input_ids=ids).logits.float().contiguous()
    except Exception as error:  # one family's failure is reported, the others still load
        errors[name] = f"{{type(error).__name__}}: {{error}}"[:2000]
save_file(out, out_file)
print("ERRORS=" + __import__("json").dumps(errors))
"""


def reload_all(jobs: list[tuple[str, Path, str]], work: Path, remote: bool = False) -> tuple[dict, dict]:
    """Load every (name, folder, model class) in ONE fresh Python process; (logits, errors) by name.
    `remote`: through each checkpoint's auto_map with trust_remote_code=True, optimum_grape unimportable."""
    probe, out = work / "probe.safetensors", work / f"reloaded{'-remote' if remote else ''}.safetensors"
    save_file({"ids": PROBE.contiguous()}, str(probe))
    code = textwrap.dedent(RELOAD.format(jobs=[(n, str(f), c) for n, f, c in jobs], probe=str(probe), out=str(out),
                                         remote=remote))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800)
    if run.returncode != 0:
        raise RuntimeError(f"The fresh-process reload crashed:\n{run.stderr[-3000:]}")
    errors = json.loads(run.stdout.rsplit("ERRORS=", 1)[1])
    return load_file(str(out)), errors


def run_matrix(modules: list[str] | None = None, work: Path | None = None) -> list[FamilyResult]:
    """Every family through stage 1, then one reload process for all saved checkpoints."""
    modules = fused_modules() if modules is None else modules
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work or tmp)
        results, expected = {}, {}
        for module in modules:
            try:
                results[module], logits = prune_family(module, work / module)
            except Exception as error:  # noqa: BLE001 -- a failing family is a row of the matrix, not the end of it
                results[module], logits = FamilyResult(module, reason=f"{type(error).__name__}: {error}"), None
            if logits is not None:
                expected[module] = logits
        jobs = [(m, work / m, results[m].model_class) for m in expected]
        reloaded, errors = reload_all(jobs, work) if jobs else ({}, {})
        remote_jobs, remote_status = [], {}
        for module, folder, class_name in jobs:
            config = json.loads((folder / "config.json").read_text())
            if config.get("auto_map"):
                remote_jobs.append((module, folder, class_name))
            else:
                remote_status[module] = config.get("grape_remote_code", "not written")
                if remote_status[module].startswith("not needed"):
                    remote_status[module] = "not needed (uniform counts)"
        remote, remote_errors = reload_all(remote_jobs, work, remote=True) if remote_jobs else ({}, {})
        for module, want in expected.items():
            result = results[module]
            got = reloaded.get(module)
            result.reload_max_diff = float((got - want).abs().max()) if got is not None else None
            result.checks["reload"] = got is not None and result.reload_max_diff <= RELOAD_ATOL
            if got is None:
                result.reason = f"reload failed: {errors.get(module, 'no logits')}"
            elif not result.checks["reload"]:
                result.reason = f"reloaded logits differ by up to {result.reload_max_diff:.2e}"
            if module in remote_status:
                result.remote_code = remote_status[module]
            elif remote.get(module) is not None and float((remote[module] - want).abs().max()) <= RELOAD_ATOL:
                result.remote_code = "exact"
            else:
                result.remote_code = f"failed: {remote_errors.get(module, 'logits differ')}"[:300]
            failed = [name for name, ok in result.checks.items() if not ok]
            result.status = "failed" if failed else "supported"
            if failed and not result.reason:
                result.reason = f"checks failed: {', '.join(failed)}"
    return [results[m] for m in modules]
