"""`optimum-grape prune`: its arguments, the config they build, the checks made before anything
loads, and the report it prints. The job itself is `prune_job.run_prune_job`, which `publish` shares.
Heavy imports are deferred into the command so that `--help` and optimum-cli stay fast."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..checkpoint.load import DEFAULT_MODEL, default_model_path
from ..errors import GrapeError
from .preflight import parse_number


def add_arguments(prune: argparse.ArgumentParser) -> None:
    prune.description = ("Prune BASE (a local model folder or Hub id already in the cache, or 'default' for the small "
                         "Mixtral shipped with optimum-grape).")
    prune.add_argument("base", help="model folder, cached Hub id, or 'default'")
    prune.add_argument("--output", "-o", required=True, help="folder to write (must not exist or be empty)")
    budget = prune.add_mutually_exclusive_group()
    budget.add_argument("--ratio", type=float, default=None,
                        help="fraction of all routed experts to remove, in (0, 1) (default: 0.25)")
    budget.add_argument("--num-experts-to-prune", type=int, default=None,
                        help="exact number of routed experts to remove, instead of --ratio")
    prune.add_argument("--method", default=None, help="pruning method, see `optimum-grape methods` (default: grape)")
    prune.add_argument("--allocation", choices=["global", "uniform"], default=None,
                       help="global: one budget where redundancy is; uniform: same cut per layer (default: the "
                            "method's own, global for grape)")
    prune.add_argument("--preset", choices=["default", "paper"], default=None,
                       help="default: usage-aware merge cost, layer cap, super experts kept, gamma and merge chosen end "
                            "to end; paper: GRAPE's Algorithm 1 as published (CKA, gamma 0.1, no cap); see "
                            "optimum_grape/docs/methods.md, installed with the package (default: default)")
    prune.add_argument("--similarity", choices=["merge_cost", "cka", "cosine", "mse"], default=None,
                       help="expert similarity (default: the preset's: merge_cost, or cka for --preset paper)")
    prune.add_argument("--merge", choices=["weighted", "saliency", "drop", "affinity"], default=None,
                       help="how a cluster becomes one expert (default: grape chooses weighted or drop end to end; "
                            "other methods their own)")
    prune.add_argument("--router", choices=["representative", "mean"], default=None,
                       help="router row of a merged expert (default: the method's own)")
    prune.add_argument("--no-align", action="store_true",
                       help="average merged experts without first aligning their neurons")
    prune.add_argument("--no-align-on-activations", action="store_true",
                       help="align neurons on their weights only, not also on their calibration activations")
    prune.add_argument("--refit", action="store_true",
                       help="refit merged experts' down projections by least squares on calibration tokens")
    prune.add_argument("--sequential", action="store_true",
                       help="re-plan each layer on the inputs its already-merged predecessors produce (REAM)")
    prune.add_argument("--merge-tokens", type=int, default=8192,
                       help="calibration tokens per layer used when merging (default: 8192)")
    prune.add_argument("--entropy-tolerance", default=None, metavar="GAMMA",
                       help="GRAPE gamma in [0, 1], or 'auto' (default preset): plan several gammas and the uniform "
                            "allocation, keep the closest to the unpruned model on held-aside calibration text")
    prune.add_argument("--layer-cap", default=None, metavar="FACTOR",
                       help="a layer loses at most FACTOR x the average cut, free merges aside ('none': no cap; "
                            "default: the preset's, 2, also scored without the cap)")
    prune.add_argument("--no-protect-super-experts", action="store_true",
                       help="allow merging experts with extreme output outliers (kept by the default preset)")
    prune.add_argument("--selection-samples", type=int, default=None,
                       help="calibration sequences held aside, from documents calibration does not use, to score "
                            "candidate plans; 0: no scoring (default: 8)")
    prune.add_argument("--min-experts-per-layer", type=int, default=None,
                       help="no layer keeps fewer experts than this, nor fewer than its router's top-k (default: 1)")
    prune.add_argument("--dataset", default=None, help="calibration text file (documents separated by blank lines) "
                                                        "or saved datasets folder (default: the shipped calibration text)")
    prune.add_argument("--num-samples", type=int, default=64,
                       help="calibration sequences, packed from documents in a seeded random order (default: 64)")
    prune.add_argument("--sequence-length", type=int, default=256, help="tokens per calibration sequence (default: 256)")
    prune.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    prune.add_argument("--max-tokens-per-layer", type=int, default=512,
                       help="tokens per layer on which every expert is run to compare experts (default: 512)")
    prune.add_argument("--seed", type=int, default=0,
                       help="seed of the document order, token samples and random choices (default: 0)")
    prune.add_argument("--method-kwargs", default=None,
                       help="JSON object of method-specific hyperparameters (see optimum_grape/docs/methods.md, "
                            "installed with the package)")
    source = prune.add_mutually_exclusive_group()
    source.add_argument("--plan", default=None,
                        help="apply this plan JSON instead of planning; the calibration options still say what the "
                             "merges are computed on, in memory and --layer-by-layer alike")
    source.add_argument("--stats", default=None, help="plan from these statistics (written by --save-stats) instead "
                                                      "of calibrating")
    prune.add_argument("--force-plan", action="store_true",
                       help="apply a plan (or statistics) even if it was computed for a different model: its recorded "
                            "architecture or router weights differ from BASE's")
    prune.add_argument("--save-stats", default=None, help="also write calibration statistics (.safetensors); an "
                                                          "existing file is replaced only with --overwrite")
    prune.add_argument("--evaluate", action="store_true", help="held-out perplexity before and after")
    prune.add_argument("--eval-tokens", type=int, default=8192, help="tokens per held-out domain to score (default: "
                                                                     "8192)")
    prune.add_argument("--overwrite", action="store_true",
                       help="replace an output folder holding a checkpoint optimum-grape wrote (nothing else)")
    prune.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="also upload to this Hub repo")
    prune.add_argument("--base-model", default=None, metavar="REPO_ID",
                       help="Hub id of the base model, for the card's base_model (default: BASE if it is not a "
                            "local folder)")
    prune.add_argument("--trust-remote-code", action="store_true",
                       help="run the model code a checkpoint ships (only for checkpoints you trust)")
    prune.add_argument("--layer-by-layer", action="store_true",
                       help="never load BASE whole: read, calibrate, merge and write one decoder layer at a time from "
                            "its safetensors shards (same plan and weights as in memory; peak memory about one layer "
                            "plus the embeddings; with disk free for the model twice beside --output, converted layers "
                            "are kept there between passes, which is faster)")
    prune.add_argument("--device", default=None, help="run the in-memory job on this device (cpu, cuda, cuda:N); under "
                                                      "torchrun 'cuda' is each process's own GPU")
    prune.add_argument("--device-map", default=None, help="let accelerate place the model (e.g. 'auto')")


def _config_from_args(args):
    from ..config import GrapeConfig
    from .preflight import parse_method_kwargs

    # Fields the user left unset keep the preset's value (GrapeConfig's 'preset' default).
    preset_fields = {"similarity": args.similarity, "entropy_tolerance": _gamma(args.entropy_tolerance)}
    preset_fields = {k: v for k, v in preset_fields.items() if v is not None}
    if args.layer_cap is not None:
        preset_fields["layer_cap"] = None if args.layer_cap == "none" else parse_number("--layer-cap", args.layer_cap)
    if args.no_protect_super_experts:
        preset_fields["protect_super_experts"] = False
    return GrapeConfig(
        method=args.method or "grape", num_experts_to_prune=args.num_experts_to_prune,
        pruning_ratio=0.25 if args.ratio is None and args.num_experts_to_prune is None else args.ratio,
        allocation=args.allocation, preset=args.preset or "default",
        selection_samples=8 if args.selection_samples is None else args.selection_samples, **preset_fields,
        min_experts_per_layer=1 if args.min_experts_per_layer is None else args.min_experts_per_layer, merge=args.merge, router=args.router,
        dataset=args.dataset, num_samples=args.num_samples, sequence_length=args.sequence_length,
        batch_size=args.batch_size, max_tokens_per_layer=args.max_tokens_per_layer, seed=args.seed,
        align_neurons=not args.no_align, align_on_activations=not args.no_align_on_activations, refit=args.refit,
        sequential=args.sequential, merge_tokens=args.merge_tokens,
        method_kwargs=parse_method_kwargs(args.method_kwargs), layer_by_layer=args.layer_by_layer,
    )


# What a plan fixes: giving one of these with --plan would be silently ignored, so it is refused.
PLAN_FIXES = {"ratio": "--ratio", "num_experts_to_prune": "--num-experts-to-prune", "method": "--method",
              "allocation": "--allocation", "preset": "--preset", "similarity": "--similarity", "merge": "--merge",
              "router": "--router", "entropy_tolerance": "--entropy-tolerance", "layer_cap": "--layer-cap",
              "no_protect_super_experts": "--no-protect-super-experts", "selection_samples": "--selection-samples",
              "min_experts_per_layer": "--min-experts-per-layer", "method_kwargs": "--method-kwargs",
              "no_align": "--no-align", "sequential": "--sequential"}


def _plan_config(args, plan):
    """The config a saved plan is applied with: what it recorded, and the calibration options the
    merges use (the same in memory and layer by layer)."""
    from ..config import GrapeConfig

    given = [flag for name, flag in PLAN_FIXES.items() if getattr(args, name) not in (None, False)]
    if given:
        raise GrapeError(f"--plan fixes the clusters, budget, method and merge; {', '.join(given)} would be ignored. "
                         "Drop them, or plan again without --plan.")
    return GrapeConfig(method=plan.method, num_experts_to_prune=max(1, plan.num_removed),
                       allocation=plan.metadata.get("allocation"), merge=plan.metadata.get("merge"),
                       router=plan.router, align_neurons=plan.align_neurons, dataset=args.dataset,
                       num_samples=args.num_samples, sequence_length=args.sequence_length, batch_size=args.batch_size,
                       max_tokens_per_layer=args.max_tokens_per_layer, seed=args.seed, merge_tokens=args.merge_tokens,
                       align_on_activations=not args.no_align_on_activations, refit=args.refit,
                       selection_samples=0, layer_by_layer=args.layer_by_layer)


def _gamma(value: str | None):
    """--entropy-tolerance: 'auto' or a number in [0, 1] (argparse gives a string)."""
    return value if value is None or value == "auto" else parse_number("--entropy-tolerance", value)


def run(args) -> int:
    from ..calibration import load_calibration_data
    from ..checkpoint.save import push_folder
    from ..checkpoint.destinations import check_destination, check_free_space, check_stats_destination
    from .preflight import check_can_push, check_eval_tokens, check_repo_id, read_plan_file, read_stats_file
    from .prune_job import PruneJob, run_prune_job
    from ..pruner import GrapePruner

    from ..calibration import distributed

    _check_placement(args)
    # Everything that can be refused is checked before the model is loaded; nothing a job reads is
    # ever a path it writes.
    if not args.output.strip():  # Path("") is ".", the current folder
        raise GrapeError("--output is empty text; give a new folder path such as ./mixtral-grape-25.")
    output = Path(args.output)
    reads = [default_model_path() if args.base == DEFAULT_MODEL else args.base, args.plan, args.stats, args.dataset]
    check_destination(output, args.overwrite, reads)
    if args.plan is None and args.num_experts_to_prune is None:
        check_free_space(output, reads[0], 0.25 if args.ratio is None else args.ratio)
    if args.save_stats:
        if args.plan or args.stats:
            raise GrapeError("--save-stats writes what calibration measures; with --plan or --stats nothing is "
                             "calibrated. Drop --save-stats.")
        check_stats_destination(args.save_stats, args.overwrite, reads, output)
    check_eval_tokens(args.eval_tokens)
    if args.push_to_hub:
        check_repo_id("--push-to-hub", args.push_to_hub)
        check_can_push("--push-to-hub")
    if args.base_model is not None:
        check_repo_id("--base-model", args.base_model)
    plan = read_plan_file(args.plan) if args.plan is not None else None
    stats = read_stats_file(args.stats) if args.stats is not None else None
    pruner = GrapePruner(_plan_config(args, plan) if plan is not None else _config_from_args(args))
    data = load_calibration_data(pruner.config.dataset)  # checked before loading
    job = PruneJob(base=args.base, output=output, plan=plan, stats=stats, data=data, evaluate=args.evaluate,
                   eval_tokens=args.eval_tokens, window=args.sequence_length, base_model=args.base_model,
                   overwrite=args.overwrite, save_stats=args.save_stats, trust_remote_code=args.trust_remote_code,
                   check_model=not args.force_plan, device=args.device, device_map=args.device_map)
    report = run_prune_job(job, pruner)
    if distributed.rank() != 0:  # rank 0 reports and writes
        return 0
    plan = report.plan
    print(plan.summary())
    print("experts per MoE layer, before -> after (original expert ids merged into one):")
    for layer, clusters in plan.clusters.items():
        merged = [c for c in clusters if len(c) > 1]
        print(f"  layer {layer}: {plan.num_experts_before[layer]} -> {len(clusters)}" +
              (f"  merged {merged}" if merged else ""))
    (params_before, params_after) = report.params
    print(f"parameters: {params_before:,} -> {params_after:,} ({params_after / params_before:.3f}x)")
    if report.bytes:
        bytes_before, bytes_after = report.bytes
        print(f"weights on disk: {bytes_before / 1e6:.2f} MB -> {bytes_after / 1e6:.2f} MB "
              f"({bytes_after / bytes_before:.3f}x)")
    for domain, before in report.before.items():
        print(f"held-out perplexity [{domain}]: {before:.2f} -> {report.after[domain]:.2f} "
              f"({report.comparison['ratios'][domain]:.3f}x)")
    print(f"pruning took {report.seconds:.1f}s; wrote {output} (model card: {output / 'README.md'})")
    if args.push_to_hub:
        push_folder(output, args.push_to_hub)  # the folder just written: no second serialisation
        print(f"pushed to https://huggingface.co/{args.push_to_hub}")
    return 0


def _check_placement(args) -> None:
    """Refuse, before anything loads, placements that cannot work together; join torchrun's group."""
    from ..calibration import distributed
    from ..checkpoint.load import resolve_device

    if args.layer_by_layer:
        if args.evaluate:
            raise GrapeError("--evaluate loads the whole model to score it, which --layer-by-layer exists to avoid; "
                             "drop --evaluate and score the pruned checkpoint where it fits (optimum-grape eval).")
        if args.device not in (None, "cpu") or args.device_map is not None:
            raise GrapeError("--layer-by-layer runs on the CPU, one layer in memory at a time; drop --device/"
                             "--device-map (or prune in memory on the GPU without --layer-by-layer).")
        if distributed.launched():
            raise GrapeError("--layer-by-layer runs in one process; calibrate across processes in memory (without "
                             "--layer-by-layer), or run it without torchrun.")
    if args.device is not None and args.device_map is not None:
        raise GrapeError("Pass --device or --device-map, not both.")
    if args.device is not None:
        resolve_device(args.device)
    if distributed.launched() and (args.plan or args.stats):
        raise GrapeError("--plan and --stats calibrate nothing, so there is nothing to share across processes; run "
                         "them without torchrun.")
    distributed.init_from_environment(args.device or "cpu")
