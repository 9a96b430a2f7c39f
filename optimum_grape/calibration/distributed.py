"""Calibration across processes (torch.distributed): which calibration batches each rank runs, and
the reductions that make every rank hold the statistics one process would have measured.

Launched by `torchrun --nproc_per_node N -m optimum_grape prune ...` (or `accelerate launch`), the
command line calls `init_from_environment()`: gloo on CPU, nccl on CUDA. Batch b goes to rank
b mod N; every statistic a recorder keeps is a sum (all-reduced), a maximum (all-reduced) or token
samples keyed by their global batch index (gathered to every rank and put back in batch order), so
every rank finalises the same statistics, plans the same plan, and rank 0 writes it. Tensors only:
nothing is pickled (no `all_gather_object`).
"""

from __future__ import annotations

import os

import torch


def active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def launched() -> bool:
    """Started by torchrun / accelerate launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment(device: str = "cpu") -> None:
    """Join the process group torchrun set up in the environment (idempotent)."""
    if not launched() or torch.distributed.is_initialized():
        return
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend=backend)


def shard(items: list) -> list[tuple[int, object]]:
    """(global index, item) of the items this rank runs: every world_size-th, from its rank."""
    return [(i, item) for i, item in enumerate(items) if i % world_size() == rank()]


def reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """All-reduce in place (sum or max); a no-op in a single process."""
    if active():
        red = torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX
        torch.distributed.all_reduce(tensor, op=red)
    return tensor


def gather_rows(keys: list[int], rows: list[torch.Tensor]) -> tuple[list[int], list[torch.Tensor]]:
    """Every rank's (key, tensor) pairs, on every rank, sorted by key, as (keys, tensors): tensors
    share their trailing shape and dtype, and may differ in their first dimension (padded for the
    transfer)."""
    if not active():
        return _sorted(list(zip(keys, rows)))
    device = rows[0].device if rows else torch.device("cuda" if torch.distributed.get_backend() == "nccl" else "cpu")
    local = torch.tensor([[k, t.shape[0]] for k, t in zip(keys, rows)] or torch.empty(0, 2), dtype=torch.long,
                         device=device).reshape(-1, 2)
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    torch.distributed.all_gather(counts, torch.tensor([local.shape[0]], dtype=torch.long, device=device))
    most = int(max(c.item() for c in counts))
    meta = [torch.zeros(most, 2, dtype=torch.long, device=device) for _ in range(world_size())]
    torch.distributed.all_gather(meta, torch.cat([local, torch.zeros(most - local.shape[0], 2, dtype=torch.long,
                                                                     device=device)]))
    packed = torch.cat(rows) if rows else None
    total = [int(m[: int(c.item()), 1].sum()) for m, c in zip(meta, counts)]
    like = _agree_on_shape(packed, device)
    width = max(total)
    buffers = [torch.zeros((width, *like[1:]), dtype=like[0], device=device) for _ in range(world_size())]
    mine = packed if packed is not None else torch.zeros((0, *like[1:]), dtype=like[0], device=device)
    torch.distributed.all_gather(buffers, torch.cat([mine, torch.zeros((width - mine.shape[0], *like[1:]),
                                                                       dtype=like[0], device=device)]))
    out = []
    for m, c, buf in zip(meta, counts, buffers):
        start = 0
        for key, n in m[: int(c.item())].tolist():
            out.append((key, buf[start:start + n]))
            start += n
    return _sorted(out)


def _sorted(pairs: list[tuple[int, torch.Tensor]]) -> tuple[list[int], list[torch.Tensor]]:
    pairs = sorted(pairs, key=lambda kt: kt[0])
    return [k for k, _ in pairs], [t for _, t in pairs]


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32]


def _agree_on_shape(packed: torch.Tensor | None, device) -> tuple:
    """(dtype, *trailing shape) every rank uses: taken from a rank that has rows."""
    code = torch.full((8,), -1, dtype=torch.long, device=device)
    if packed is not None:
        code[0] = _DTYPES.index(packed.dtype)
        code[1] = packed.dim() - 1
        code[2:2 + packed.dim() - 1] = torch.tensor(packed.shape[1:], dtype=torch.long)
    torch.distributed.all_reduce(code, op=torch.distributed.ReduceOp.MAX)
    if int(code[0]) < 0:
        raise RuntimeError("No rank has calibration samples to gather.")
    return (_DTYPES[int(code[0])], *[int(v) for v in code[2:2 + int(code[1])]])


def barrier() -> None:
    if active():
        torch.distributed.barrier()
