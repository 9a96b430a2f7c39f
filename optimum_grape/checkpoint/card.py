"""The generated model card (README.md) of a pruned checkpoint, rendered from the Jinja template
`optimum_grape/model_cards/grape_pruned.md` through `huggingface_hub.ModelCard.from_template`.

Everything the card shows is read back from the folder (`config.json`, `grape_plan.json`, and
`grape_card.json`: base model, license, measured perplexities and accuracies), so the card can be
re-rendered without the model, e.g. after `optimum-grape eval` adds accuracies. The plot of
experts per layer (and each layer's redundancy, when the plan measured it) is saved beside it.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor, wait
from importlib import resources
from pathlib import Path

from ..plan import PruningPlan
from .remote_code import REMOTE_FILE

logger = logging.getLogger("optimum_grape")
CARD_INPUTS = "grape_card.json"
PLOT_FILE = "experts_per_layer.png"
# The Hub knows adapter / merge / quantized / finetune; "merge" means combining several models and
# "quantized" changing number formats, so a pruned copy of ONE base is a (training-free) finetune.
BASE_MODEL_RELATION = "finetune"
# Card text taken from a plan or grape_card.json (which anyone can edit or share) is kept to one line
# of this many characters and escaped: it can never add HTML, a link or a table row to the card.
MAX_TEXT = 200
_MARKDOWN_SPECIALS = "\\`[]|#"  # links, code, table cells, headings (emphasis is harmless)


def _one_line(value) -> str:
    """`value` as one line of at most MAX_TEXT characters (cut with '...')."""
    text = " ".join(str(value).split())
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT - 3] + "..."


def plain(value) -> str:
    """`value` as inert Markdown text: one line, at most MAX_TEXT characters, HTML and Markdown escaped."""
    text = _one_line(value).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return "".join("\\" + ch if ch in _MARKDOWN_SPECIALS else ch for ch in text)


def code(value) -> str:
    """`value` for inside a `code span`: one line, no backtick to close the span early."""
    return _one_line(str(value).replace("`", "'"))


def python_string(value) -> str:
    """`value` as a Python string literal inside a code block (no fence can be closed from inside)."""
    return json.dumps(" ".join(str(value).split())).replace("`", "\\u0060")


def _repo_id(value) -> str | None:
    """A Hub id the card's metadata and links may carry; anything else is left out with a warning."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not value:
        return None
    try:
        validate_repo_id(str(value))
    except HFValidationError:
        logger.warning("base_model %r is not a Hub repository id; the card leaves it out.", str(value)[:MAX_TEXT])
        return None
    return str(value)


def template_path() -> Path:
    return Path(str(resources.files("optimum_grape") / "model_cards" / "grape_pruned.md"))


def read_inputs(folder) -> dict:
    path = Path(folder) / CARD_INPUTS
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def write_inputs(folder, inputs: dict) -> None:
    (Path(folder) / CARD_INPUTS).write_text(json.dumps(inputs, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def base_license(base) -> dict:
    """license / license_name / license_link from the base model's own card: a local folder's
    README.md, or the README of a Hub id already in the local cache (never downloaded)."""
    from huggingface_hub import ModelCard, try_to_load_from_cache

    if base is None:
        return {}
    if Path(str(base)).exists():
        readme = Path(str(base)) / "README.md"
    else:
        cached = try_to_load_from_cache(str(base), "README.md") if str(base).count("/") == 1 else None
        readme = Path(cached) if isinstance(cached, str) else None
    if readme is None or not readme.is_file():
        return {}
    data = ModelCard.load(readme, ignore_metadata_errors=True).data
    return {k: getattr(data, k) for k in ("license", "license_name", "license_link") if getattr(data, k, None)}


# The Hub dataset each lm-eval task scores (model-index `dataset.type` is a Hub dataset id), with the
# subset where the dataset has several. Our held-out text has no Hub id: its entries keep a local name.
HUB_DATASETS = {"hellaswag": ("Rowan/hellaswag", None), "piqa": ("ybisk/piqa", None),
                "arc_easy": ("allenai/ai2_arc", "ARC-Easy"), "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
                "boolq": ("google/boolq", None), "winogrande": ("allenai/winogrande", "winogrande_xl"),
                "openbookqa": ("allenai/openbookqa", "main"), "sciq": ("allenai/sciq", None)}


def _eval_results(inputs: dict, model_type: str):
    from huggingface_hub import EvalResult

    results = [EvalResult(task_type="text-generation", dataset_type=meta_text(v.get("dataset", name)),
                          dataset_name=meta_text(v.get("dataset", name)), metric_type="perplexity",
                          metric_value=round(v["after"], 4))
               for name, v in inputs.get("evaluation", {}).items()]
    for key, v in inputs.get("accuracy", {}).items():
        hub_id, subset = HUB_DATASETS.get(v.get("task", ""), (v.get("dataset", key), None))
        metric = meta_text(v.get("metric", "acc"))
        results.append(EvalResult(task_type="multiple-choice", task_name=meta_text(v.get("task") or key),
                                  dataset_type=meta_text(hub_id), dataset_name=meta_text(v.get("dataset_name", key)),
                                  dataset_config=subset, metric_type=metric, metric_value=round(v["value"], 4),
                                  metric_name=f"{metric} (0-shot, lm-eval)"))
    return results


def meta_text(value) -> str:
    """`value` for the card's YAML metadata: one line, at most MAX_TEXT characters, no markup."""
    text = " ".join(str(value).split()).replace("<", "").replace(">", "")
    return text[:MAX_TEXT]


def card_data(config: dict, plan: PruningPlan | None, inputs: dict):
    from huggingface_hub import ModelCardData

    model_type = config.get("model_type", "moe")
    tags = ["moe", "pruning", "grape", "optimum-grape", model_type] + ([f"method-{plan.method}"] if plan else [])
    results = _eval_results(inputs, model_type)
    base = _repo_id(inputs.get("base_model"))
    return ModelCardData(library_name="transformers", base_model=base, tags=tags, pipeline_tag="text-generation",
                         model_name=f"{model_type}-grape-pruned" if results else None, eval_results=results or None,
                         base_model_relation=BASE_MODEL_RELATION if base else None, **inputs.get("license", {}))


def _plan_vars(plan: PruningPlan, config: dict) -> dict:
    meta = plan.metadata
    redundancy = meta.get("layer_redundancy") if isinstance(meta.get("layer_redundancy"), dict) else {}
    before, after = sum(plan.num_experts_before.values()), sum(plan.experts_per_layer.values())
    layers = []
    for layer, clusters in sorted(plan.clusters.items()):
        merged = [c for c in clusters if len(c) > 1]
        r = redundancy.get(str(layer), redundancy.get(layer))
        layers.append({"layer": layer, "before": plan.num_experts_before[layer], "after": len(clusters),
                       "redundancy": f"{r:.4f}" if _is_number(r) else "",
                       "merged": ", ".join("{" + ", ".join(map(str, c)) + "}" for c in merged) or "none"})
    candidates = meta.get("candidates")
    chosen = meta["selection"].get("chosen") if isinstance(meta.get("selection"), dict) else None
    rows = []
    if isinstance(candidates, list) and all(isinstance(c, dict) for c in candidates):
        rows = [{"name": plain(c.get("name", "?")), "experts_per_layer": _counts(c.get("experts_per_layer")),
                 "score": _score(c.get("score")), "chosen": c.get("name") == chosen}
                for c in candidates]
    # Metadata is free-form: a hand-edited plan may hold anything where a dict is expected.
    selection = meta.get("selection") if isinstance(meta.get("selection"), dict) else {}
    calibration = meta.get("calibration") if isinstance(meta.get("calibration"), dict) else {}
    optional = {"selection_metric": selection.get("metric"), "selection_tokens": selection.get("tokens"),
                "not_scored_because": selection.get("not_scored_because")}
    return {"method": plain(plan.method), "allocation": plain(meta.get("allocation", "?")),
            "merge": plain(meta.get("merge", "?")), "router": plain(plan.router), "before": before,
            "removed": before - after, "removed_pct": f"{(before - after) / before:.1%}", "layers": layers,
            "has_redundancy": bool(redundancy),
            "similarity": plain(meta.get("similarity") or calibration.get("similarity") or "?"),
            "routing_overrides": code(json.dumps(meta.get("routing_overrides"))) if meta.get("routing_overrides") else "",
            "candidates": rows, **{k: None if v is None else plain(v) for k, v in optional.items()},
            "calibration_sequences": plain(calibration.get("num_sequences", "?")),
            "calibration_tokens": plain(calibration.get("num_tokens", "?"))}


def _counts(value) -> str:
    """A candidate's experts per layer: a list of integers, shown as is; anything else escaped."""
    ints = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return str(value) if ints else plain("?" if value is None else value)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _score(value) -> str:
    return f"{value:.5f}" if _is_number(value) else ""


def save_plot(plan: PruningPlan, path: Path) -> bool:
    """Bars: experts before and after per layer; line: each layer's redundancy when the plan has it.
    Needs matplotlib (`pip install optimum-grape[plots]`); without it the card has no picture. Drawn
    on a Figure of its own, not through pyplot: no global state, so it can run on a thread
    (`plot_ahead`) and never switches the backend of the user's process."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed: the model card has no experts-per-layer plot "
                       "(pip install optimum-grape[plots]).")
        return False
    layers = sorted(plan.clusters)
    fig = Figure(figsize=(max(4.5, 0.35 * len(layers) + 2), 3.6), dpi=100)
    ax = fig.subplots()
    ax.bar(layers, [plan.num_experts_before[l] for l in layers], color="#d9d9d9", label="before")
    ax.bar(layers, [plan.experts_per_layer[l] for l in layers], color="#3b75af", label="after")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("routed experts")
    handles, labels = ax.get_legend_handles_labels()
    redundancy = plan.metadata.get("layer_redundancy") or {}
    if redundancy:
        twin = ax.twinx()
        twin.plot(layers, [redundancy.get(str(l), float("nan")) for l in layers], "o-", color="#c44e52",
                  label="redundancy")
        twin.set_ylabel("redundancy (mean pairwise similarity)")
        more = twin.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, fontsize=8, frameon=False)
    ax.set_title(f"{plan.method}: experts kept per layer")
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    return True


# Plots being drawn on a thread while the weights are written: path -> (what the plot shows, result).
_PLOTS_AHEAD: dict[Path, tuple[str, Future]] = {}


def _plotted(plan: PruningPlan) -> str:
    """Everything of `plan` that `save_plot` draws, as one string."""
    return json.dumps([plan.method, sorted(plan.clusters), {str(k): v for k, v in plan.num_experts_before.items()},
                       {str(k): v for k, v in plan.experts_per_layer.items()},
                       plan.metadata.get("layer_redundancy") or {}], sort_keys=True, default=str)


def plot_ahead(plan: PruningPlan, folder) -> Future:
    """Start drawing the card's plot of `plan` into `folder` on a thread; the card takes it when it is
    rendered, if the plan it reads draws the same. Why: drawing (importing matplotlib, rendering) took
    about a second of a 24 s pruning job, and it needs only the plan, which is final before the
    weights are written, which spend most of their time outside the interpreter."""
    path = Path(folder) / PLOT_FILE
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grape-plot")
    future = pool.submit(save_plot, plan, path)
    pool.shutdown(wait=False)
    _PLOTS_AHEAD[path] = (_plotted(plan), future)
    return future


def wait_for_plot(folder) -> None:
    """Let a plot started by `plot_ahead` finish (before its folder is deleted), ignoring its result."""
    ahead = _PLOTS_AHEAD.pop(Path(folder) / PLOT_FILE, None)
    if ahead is not None:
        wait([ahead[1]])


def _plot(plan: PruningPlan, path: Path) -> bool:
    ahead = _PLOTS_AHEAD.pop(path, None)
    if ahead is not None:
        drawn = ahead[1].result()
        if ahead[0] == _plotted(plan):
            return drawn
    return save_plot(plan, path)


def render_model_card(folder, repo_or_path: str | None = None) -> str:
    """The card of the checkpoint in `folder` (config.json, and grape_plan.json / grape_card.json if
    present); writes the plot into `folder` as a side effect."""
    from huggingface_hub import ModelCard

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    plan_file = folder / "grape_plan.json"
    plan = PruningPlan.from_json(plan_file.read_text(encoding="utf-8")) if plan_file.exists() else None
    inputs = read_inputs(folder)
    quant = dict(config.get("quantization_config") or {})
    quant.pop("pruned_layout", None)
    counts = [c for c in config.get("num_local_experts_per_layer") or [] if c is not None]
    evaluation = inputs.get("evaluation", {})
    accuracy = inputs.get("accuracy", {})
    variables = {
        "title": plain(f"{config.get('model_type', 'MoE')} with experts pruned by optimum-grape"),
        "plan": _plan_vars(plan, config) if plan else None,
        "plot": PLOT_FILE if plan and _plot(plan, folder / PLOT_FILE) else None,
        "license": code((inputs.get("license") or {}).get("license") or "") or None,
        "dataset": code(quant.get("dataset") or "optimum-grape shipped calibration text"),
        "perplexity": [{"name": plain(n), "before": f"{v['before']:.3f}", "after": f"{v['after']:.3f}",
                        "ratio": f"{v.get('ratio', v['after'] / v['before']):.3f}"} for n, v in evaluation.items()],
        "perplexity_how": plain(next(iter(evaluation.values()), {}).get("how", "")),
        "accuracy": [{"task": plain(v.get("task", t)), "metric": plain(v.get("metric", "acc")), "value": f"{v['value']:.4f}",
                      "stderr": "" if v.get("stderr") is None else f"{v['stderr']:.4f}", "n": plain(v.get("n", ""))}
                     for t, v in accuracy.items()],
        "accuracy_how": plain(next(iter(accuracy.values()), {}).get("how", "")),
        "hyperparameters": json.dumps(quant, indent=2, sort_keys=True).replace("`", "\\u0060"),  # keeps the fence shut
        "uniform": len(set(counts)) <= 1,
        "remote_code": REMOTE_FILE[:-3] + "." in json.dumps(config.get("auto_map") or {}),
        "remote_file": REMOTE_FILE,
        "remote_class": next((k for k in (config.get("auto_map") or {}) if k != "AutoConfig" and k.isidentifier()),
                             "AutoModelForCausalLM"),
        "remote_status": plain(config.get("grape_remote_code", "not written")),
        "repo_or_path": python_string(repo_or_path or inputs.get("repo_id") or "path/or/repo"),
    }
    data = card_data(config, plan, inputs)
    return str(ModelCard.from_template(data, template_path=str(template_path()), **variables))


def write_model_card(folder, repo_or_path: str | None = None) -> Path:
    path = Path(folder) / "README.md"
    path.write_text(render_model_card(folder, repo_or_path), encoding="utf-8")
    return path


def set_repo_id(folder, repo_id: str) -> None:
    """Name the Hub repository in a card's "How to load" (before pushing, or in a dry run)."""
    folder = Path(folder)
    if (folder / "config.json").exists():
        write_inputs(folder, {**read_inputs(folder), "repo_id": repo_id})
        write_model_card(folder)
