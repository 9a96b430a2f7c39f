"""One pruning job as the commands run it: load a base, optionally measure held-out perplexity,
calibrate -> plan -> apply (or apply a saved plan), measure again, save a Hub-ready folder. Shared
by `optimum-grape prune`, `optimum-grape publish` and `optimum-cli grape prune`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint.load import DEFAULT_MODEL, load_model_and_tokenizer, resolve_base
from ..plan import PruningPlan

logger = logging.getLogger("optimum_grape")


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


@dataclass
class PruneJob:
    """What one job prunes and how it is run and written, beside the pruner's config.

    `plan` applies a saved plan; else `stats` (saved statistics) are planned without calibrating;
    else the model is calibrated on `data` (None: the config's dataset). `check_model=False` applies a
    plan computed for another model. `device` / `device_map` place the loaded model (in memory)."""

    base: str
    output: Path
    plan: PruningPlan | None = None
    stats: object | None = None
    data: object | None = None
    evaluate: bool = False
    eval_tokens: int = 8192
    window: int = 256
    base_model: str | None = None
    overwrite: bool = False
    save_stats: str | None = None
    trust_remote_code: bool = False
    check_model: bool = True
    device: str | None = None
    device_map: object | None = None

    @property
    def hub_base_model(self) -> str | None:
        """The card's `base_model`: given explicitly, else BASE when it looks like a Hub id."""
        return self.base_model or (None if Path(self.base).exists() or self.base == DEFAULT_MODEL else self.base)


def run_prune_job(job: PruneJob, pruner) -> JobReport:
    """Run `job` with `pruner`. Under torchrun, every rank calibrates its share of the batches and
    plans; rank 0 applies and writes."""
    import torch

    from ..calibration import distributed
    from ..evaluation.perplexity import count_parameters, folder_bytes
    from ..metrics import compare, heldout_perplexities

    path = resolve_base(job.base)
    torch.manual_seed(pruner.config.seed)
    if pruner.config.layer_by_layer:
        return _run_layerwise(job, pruner, path)
    model, tokenizer = load_model_and_tokenizer(path, trust_remote_code=job.trust_remote_code, device=job.device,
                                                device_map=job.device_map)
    params_before = count_parameters(model)
    bytes_before = folder_bytes(path) if Path(path).is_dir() else None
    if job.evaluate:
        logger.info("Measuring the base model's held-out perplexity (%d tokens per domain) ...", job.eval_tokens)
    before = heldout_perplexities(model, tokenizer, job.eval_tokens, job.window) if job.evaluate else {}
    start = time.perf_counter()
    plan, stats = job.plan, job.stats
    if plan is None:
        if stats is None:
            stats = pruner.calibrate(model, job.data, tokenizer)
            if job.save_stats and distributed.rank() == 0:
                stats.save(job.save_stats)
        else:
            pruner.prepare_data(job.data, tokenizer, model)  # held-aside windows to score candidates, data to merge with
        plan = pruner.plan(stats, model)  # scores GRAPE's candidate plans on held-aside calibration text
    else:
        pruner.prepare_data(job.data, tokenizer, model)  # a saved plan merges on the same data as layer by layer
    if distributed.rank() != 0:  # every rank planned the same plan; rank 0 applies and writes it
        return JobReport(output=Path(job.output), plan=plan, params=(params_before, params_before), bytes=None)
    pruner.apply(model, plan, check_model=job.check_model)
    seconds = time.perf_counter() - start
    after, comparison = {}, {}
    if job.evaluate:
        logger.info("Measuring the pruned model's held-out perplexity (%d tokens per domain) ...", job.eval_tokens)
        after = heldout_perplexities(model, tokenizer, job.eval_tokens, job.window)
        comparison = compare(after, before)
        how = f"perplexity on the first {job.eval_tokens} tokens of each held-out file, windows of {job.window}"
        pruner.evaluation = {f"perplexity ({d})": {"before": before[d], "after": after[d],
                                                   "ratio": comparison["ratios"][d], "how": how,
                                                   "dataset": f"optimum-grape held-out {d}"} for d in before}
    logger.info("Writing the pruned checkpoint to %s ...", job.output)
    output = pruner.save_pretrained(model, job.output, tokenizer, overwrite=job.overwrite,
                                    base_model=job.hub_base_model)
    return JobReport(output=Path(output), plan=plan, params=(params_before, count_parameters(model)),
                     bytes=(bytes_before, folder_bytes(output)) if bytes_before else None, before=before,
                     after=after, comparison=comparison, seconds=seconds)


def _run_layerwise(job: PruneJob, pruner, path) -> JobReport:
    """The same job on a checkpoint read one decoder layer at a time (`GrapePruner.prune_checkpoint`)."""
    from ..evaluation.perplexity import folder_bytes

    start = time.perf_counter()
    out = pruner.prune_checkpoint(path, job.output, job.data, stats=job.stats, plan=job.plan, overwrite=job.overwrite,
                                  trust_remote_code=job.trust_remote_code, base_model=job.hub_base_model,
                                  check_model=job.check_model, save_stats=job.save_stats)
    before = _parameters_in(path)
    return JobReport(output=Path(out), plan=pruner.last_plan, params=(before, _parameters_in(out)),
                     bytes=(folder_bytes(path), folder_bytes(out)), seconds=time.perf_counter() - start)


def _parameters_in(folder) -> int:
    """Parameters of a safetensors checkpoint, from the file headers (nothing is loaded)."""
    from ..layerwise.checkpoint_index import CheckpointIndex

    return CheckpointIndex(folder).num_elements()
