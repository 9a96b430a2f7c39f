"""The package's measurements as `evaluate` modules, shipped inside the package and loaded by local
path (no Hub, works offline):

    import evaluate
    from optimum_grape.metrics import module_path
    ppl = evaluate.load(module_path("grape_perplexity"))
    ppl.compute(predictions=["some text", ...], model="path/to/model")   # or model=<model>, tokenizer=<tok>
    cmp = evaluate.load(module_path("grape_comparison"))
    cmp.compute(predictions=[pruned_ppl, ...], references=[unpruned_ppl, ...], max_ratio=1.5)

Both wrap `optimum_grape.evaluation`, so they return exactly what `optimum-grape prune --evaluate`,
`optimum-grape publish`, the benchmarks and the model card report.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

MODULES = ("grape_perplexity", "grape_comparison")


def module_path(name: str) -> str:
    """Local path of a shipped module, for `evaluate.load(path)`."""
    if name not in MODULES:
        from ..errors import GrapeError

        raise GrapeError(f"No evaluate module {name!r} in optimum-grape; choose one of {list(MODULES)}.")
    return str(Path(str(resources.files("optimum_grape") / "metrics" / name)))


@functools.lru_cache(maxsize=None)
def load(name: str):
    """`evaluate.load` of a shipped module, once per process."""
    import evaluate

    return evaluate.load(module_path(name), keep_in_memory=True)  # no Arrow cache files on disk


def heldout_perplexities(model, tokenizer, max_tokens: int, window: int) -> dict[str, float]:
    """Perplexity on the shipped held-out text per domain, through the `grape_perplexity` module."""
    from ..checkpoint.load import heldout_paths

    paths = heldout_paths()
    result = load("grape_perplexity").compute(predictions=[p.read_text(encoding="utf-8") for p in paths], model=model,
                                              tokenizer=tokenizer, window=window, max_tokens=max_tokens)
    return {p.stem: ppl for p, ppl in zip(paths, result["perplexities"])}


def compare(pruned: dict[str, float], unpruned: dict[str, float], max_ratio: float | None = None) -> dict:
    """Per-domain ratios and the worst one, through the `grape_comparison` module."""
    names = list(unpruned)
    result = load("grape_comparison").compute(predictions=[pruned[n] for n in names],
                                              references=[unpruned[n] for n in names], max_ratio=max_ratio)
    return {**result, "ratios": dict(zip(names, result["ratios"]))}
