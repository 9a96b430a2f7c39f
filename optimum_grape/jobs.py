"""One pruning job as the commands run it: load a base, optionally measure held-out perplexity,
calibrate -> plan -> apply (or apply a saved plan), measure again, save a Hub-ready folder. Shared
by `optimum-grape prune`, `optimum-grape publish` and `optimum-cli grape prune`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from .loading import DEFAULT_MODEL, load_model_and_tokenizer, resolve_model
from .plan import PruningPlan


@dataclass
class JobReport:
    output: Path
    plan: PruningPlan
    params: tuple[int, int]
    bytes: tuple[int, int] | None
    before: dict[str, float] = field(default_factory=dict)  # held-out perplexity per domain
    after: dict[str, float] = field(default_factory=dict)
    comparison: dict = field(default_factory=dict)  # grape_comparison's output
    seconds: float = 0.0


def hub_base_model(base: str, explicit: str | None) -> str | None:
    """The card's `base_model`: given explicitly, else BASE when it looks like a Hub id."""
    return explicit or (None if Path(base).exists() or base == DEFAULT_MODEL else base)


def run_prune_job(base: str, output, pruner, plan: PruningPlan | None = None, evaluate: bool = False,
                  eval_tokens: int = 8192, window: int = 256, base_model: str | None = None,
                  overwrite: bool = False, save_stats=None, trust_remote_code: bool = False, stats=None,
                  data=None, check_model: bool = True, device: str | None = None, device_map=None) -> JobReport:
    """`plan` applies a saved plan; else `stats` (saved statistics) are planned without calibrating;
    else the model is calibrated on `data` (None: the config's dataset). `check_model=False` applies a
    plan computed for another model. `device` / `device_map` place the loaded model (in-memory path).
    Under torchrun, every rank calibrates its share of the batches and plans; rank 0 writes."""
    import torch

    from . import distributed
    from .evaluation import count_parameters, folder_bytes
    from .metrics import compare, heldout_perplexities

    path = resolve_model(base)
    torch.manual_seed(pruner.config.seed)
    if pruner.config.layer_by_layer:
        return _run_layerwise(path, output, pruner, plan, stats, data, base, base_model, overwrite, save_stats,
                              trust_remote_code, check_model)
    model, tokenizer = load_model_and_tokenizer(path, trust_remote_code=trust_remote_code, device=device,
                                                device_map=device_map)
    params_before = count_parameters(model)
    bytes_before = folder_bytes(path) if Path(path).is_dir() else None
    before = heldout_perplexities(model, tokenizer, eval_tokens, window) if evaluate else {}
    start = time.perf_counter()
    if plan is None:
        if stats is None:
            stats = pruner.calibrate(model, data, tokenizer)
            if save_stats and distributed.rank() == 0:
                stats.save(save_stats)
        else:
            pruner.prepare_data(data, tokenizer)  # held-aside windows to score candidates, data to merge with
        plan = pruner.plan(stats, model)  # scores GRAPE's candidate plans on held-aside calibration text
    if distributed.rank() != 0:  # every rank planned the same plan; rank 0 applies and writes it
        return JobReport(output=Path(output), plan=plan, params=(params_before, params_before), bytes=None)
    pruner.apply(model, plan, check_model=check_model)
    seconds = time.perf_counter() - start
    after, comparison = {}, {}
    if evaluate:
        after = heldout_perplexities(model, tokenizer, eval_tokens, window)
        comparison = compare(after, before)
        how = f"perplexity on the first {eval_tokens} tokens of each held-out file, windows of {window}"
        pruner.evaluation = {f"perplexity ({d})": {"before": before[d], "after": after[d],
                                                   "ratio": comparison["ratios"][d], "how": how,
                                                   "dataset": f"optimum-grape held-out {d}"} for d in before}
    output = pruner.save_pretrained(model, output, tokenizer, overwrite=overwrite,
                                    base_model=hub_base_model(base, base_model))
    return JobReport(output=Path(output), plan=plan, params=(params_before, count_parameters(model)),
                     bytes=(bytes_before, folder_bytes(output)) if bytes_before else None, before=before,
                     after=after, comparison=comparison, seconds=seconds)


def _run_layerwise(path, output, pruner, plan, stats, data, base, base_model, overwrite, save_stats,
                   trust_remote_code, check_model) -> JobReport:
    """The same job on a checkpoint read one decoder layer at a time (`GrapePruner.prune_checkpoint`)."""
    import time

    from .evaluation import folder_bytes

    start = time.perf_counter()
    out = pruner.prune_checkpoint(path, output, data, stats=stats, plan=plan, overwrite=overwrite,
                                  trust_remote_code=trust_remote_code, base_model=hub_base_model(base, base_model),
                                  check_model=check_model, save_stats=save_stats)
    before = _parameters_in(path)
    return JobReport(output=Path(out), plan=pruner.last_plan, params=(before, _parameters_in(out)),
                     bytes=(folder_bytes(path), folder_bytes(out)), seconds=time.perf_counter() - start)


def _parameters_in(folder) -> int:
    """Parameters of a safetensors checkpoint, from the file headers (nothing is loaded)."""
    from .layerwise.checkpoint_index import CheckpointIndex

    return CheckpointIndex(folder).num_elements()
