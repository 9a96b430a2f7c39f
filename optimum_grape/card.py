"""The generated model card (README.md) of a pruned checkpoint: YAML metadata for the Hub, the
experts per layer before and after, every hyperparameter, the calibration data, measured
perplexities if any, and how to load it."""

from __future__ import annotations

import json

from .plan import PruningPlan


def _metadata(model, plan: PruningPlan | None, evaluation: dict, base_model: str | None) -> str:
    from huggingface_hub import EvalResult, ModelCardData

    tags = ["moe", "pruning", "grape", "optimum-grape", model.config.model_type]
    if plan is not None:
        tags.append(f"method-{plan.method}")
    # A model-index entry per measured metric, so the Hub shows the pruned model's scores.
    results = [EvalResult(task_type="text-generation", dataset_type=values.get("dataset", name),
                          dataset_name=values.get("dataset", name), metric_type="perplexity",
                          metric_value=round(values["after"], 4))
               for name, values in evaluation.items()]
    data = ModelCardData(library_name="transformers", base_model=base_model, tags=tags, pipeline_tag="text-generation",
                         model_name=f"{model.config.model_type}-grape-pruned" if results else None,
                         eval_results=results or None)
    return data.to_yaml()


def _layer_table(plan: PruningPlan) -> str:
    rows = ["| decoder layer | experts before | experts after | merged clusters |", "|---|---|---|---|"]
    for layer, clusters in sorted(plan.clusters.items()):
        merged = [c for c in clusters if len(c) > 1]
        shown = ", ".join("{" + ", ".join(map(str, c)) + "}" for c in merged) or "none"
        rows.append(f"| {layer} | {plan.num_experts_before[layer]} | {len(clusters)} | {shown} |")
    return "\n".join(rows)


def render_model_card(model, plan: PruningPlan | None, evaluation: dict, base_model: str | None = None) -> str:
    quant = getattr(model.config, "quantization_config", None)
    hyper = quant.to_dict() if hasattr(quant, "to_dict") else dict(quant or {})
    hyper.pop("pruned_layout", None)
    uniform = plan is not None and len(set(plan.experts_per_layer.values())) == 1
    lines = ["---", _metadata(model, plan, evaluation, base_model).strip(), "---", "",
             f"# {model.config.model_type} with experts pruned by optimum-grape", ""]
    if plan is not None:
        before, after = sum(plan.num_experts_before.values()), sum(plan.experts_per_layer.values())
        lines += [f"Method **{plan.method}** ({plan.metadata.get('allocation', '?')} allocation, "
                  f"merge: {plan.metadata.get('merge', '?')}, router rows: {plan.router}) removed "
                  f"{before - after} of {before} routed experts ({(before - after) / before:.1%}). Shared experts, "
                  "dense layers and attention are untouched.", ""]
        if base_model:
            lines += [f"Base model: `{base_model}`.", ""]
        lines += ["## Experts per layer", "", _layer_table(plan), ""]
        overrides = plan.metadata.get("routing_overrides") or {}
        if overrides:
            lines += ["Routing changes: " + json.dumps(overrides), ""]
        calib = plan.metadata.get("calibration")
        calib = calib if isinstance(calib, dict) else {}  # metadata is free-form: a hand-edited plan may hold anything
        lines += ["## Calibration", "",
                  f"{calib.get('num_sequences', '?')} sequences, {calib.get('num_tokens', '?')} tokens "
                  f"(dataset: `{hyper.get('dataset') or 'optimum-grape shipped calibration text'}`).", ""]
    if evaluation:
        lines += ["## Evaluation", "", "| metric | before | after | ratio |", "|---|---|---|---|"]
        for name, values in evaluation.items():
            ratio = values["after"] / values["before"] if values.get("before") else float("nan")
            lines.append(f"| {name} | {values['before']:.3f} | {values['after']:.3f} | {ratio:.3f} |")
        lines += ["", f"Measured by optimum-grape: {evaluation[next(iter(evaluation))].get('how', '')}", ""]
    lines += ["## Hyperparameters", "", "```json", json.dumps(hyper, indent=2, sort_keys=True), "```", "",
              "## How to load", "", "```python",
              "import optimum_grape  # registers the 'grape' layout with transformers",
              "from transformers import AutoModelForCausalLM",
              "model = AutoModelForCausalLM.from_pretrained(\"path/or/repo\")", "```", ""]
    if uniform:
        lines += ["Every MoE layer keeps the same number of experts, so this checkpoint also loads with plain "
                  "transformers and no plugin.", ""]
    else:
        lines += ["Layers keep different numbers of experts: `import optimum_grape` before loading is required. "
                  "Without it transformers warns `Unknown quantization type, got grape` and fails with a size "
                  "mismatch; with `ignore_mismatched_sizes=True` it would silently re-initialise routers and experts, "
                  "so never use that flag here.", ""]
    lines += ["Fine-tuning: `output_router_logits=True` adds a load-balancing loss that assumes equal expert counts "
              "per layer and fails on non-uniform layouts; keep it off or use uniform allocation.", ""]
    return "\n".join(lines)
