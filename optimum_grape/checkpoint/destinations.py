"""Where optimum-grape may write, and what it may replace: the output folder and the statistics file.

The rules: nothing that exists is replaced without `overwrite`; `overwrite` replaces only what
optimum-grape wrote itself (a checkpoint whose config says `quant_method: grape`, a statistics
file) and never a path the job reads (the base model, a plan, statistics, calibration data).
Writing itself is atomic (`staging.py`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from ..errors import CheckpointError
from ..stats import is_stats_file
from .manifest import written_names

def is_grape_checkpoint(folder: Path) -> bool:
    """A folder optimum-grape wrote: its config.json carries the 'grape' quantization config."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(quant, dict) and quant.get("quant_method") == "grape"


def _holds(container: Path, path: Path) -> bool:
    """`path` is `container` or lies inside it (links resolved)."""
    container, path = container.resolve(), path.resolve()
    return path == container or container in path.parents


def check_destination(out_dir, overwrite: bool, reads: Iterable = ()) -> None:
    """Refuse an output folder whose writing would lose data: a file, a folder holding something
    this job reads, a non-empty folder without `overwrite`, or, with it, one optimum-grape did not write."""
    if str(out_dir).strip() == "":
        raise CheckpointError("The output folder is empty text (it would mean the current folder); give a new "
                              "folder path such as ./mixtral-grape-25.")
    out_dir = Path(out_dir)
    if out_dir.is_symlink():
        raise CheckpointError(f"Output {str(out_dir)!r} is a symbolic link (to {os.readlink(out_dir)!r}); the output is "
                              "replaced as a whole, which would move the link. Give the real folder path instead.")
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"Output {str(out_dir)!r} is a file; the output is a folder: choose a new folder path.")
    _check_writable_parent(out_dir)
    for source in reads:
        if source is not None and Path(source).exists() and _holds(out_dir, Path(source)):
            raise CheckpointError(f"Output folder {str(out_dir)!r} holds {str(source)!r}, which this job reads; "
                                  "writing the output would replace it. Choose an output folder elsewhere.")
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise CheckpointError(
            f"Output folder {str(out_dir)!r} exists and is not empty; choose a new folder or pass overwrite=True "
            "(CLI: --overwrite) to replace it.")
    if not is_grape_checkpoint(out_dir):
        raise CheckpointError(
            f"Output folder {str(out_dir)!r} is not a checkpoint written by optimum-grape (no config.json with "
            "quant_method 'grape'); overwrite only replaces those. Choose a new folder, or empty this one yourself.")
    folders = sorted(p.name for p in out_dir.iterdir() if p.is_dir())
    if folders:
        raise CheckpointError(f"Output folder {str(out_dir)!r} holds sub-folders {folders} that optimum-grape never "
                              "writes; overwrite would delete them. Move them out first or choose a new folder.")
    written = written_names(out_dir)
    if written is not None:
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in written)
        if foreign:
            raise CheckpointError(f"Output folder {str(out_dir)!r} holds file(s) {foreign[:5]} that optimum-grape did "
                                  "not write there (they are not in its grape_manifest.json); overwrite would delete "
                                  "them. Move them out first or choose a new folder.")


def _nearest_existing(path: Path) -> Path:
    """`path`, or its closest ancestor that exists: where a folder about to be made will live."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_writable_parent(out_dir: Path) -> None:
    """The checkpoint is staged beside `out_dir` and moved in: its nearest existing ancestor must be a
    writable folder (a read-only mount or a missing drive fails here, not after the pruning)."""
    ancestor = _nearest_existing(out_dir.absolute().parent)
    if not ancestor.is_dir():
        raise CheckpointError(f"Output {str(out_dir)!r}: {str(ancestor)!r} is a file, so no folder can be made there; "
                              "choose another path.")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CheckpointError(f"Output {str(out_dir)!r}: folder {str(ancestor)!r} is not writable (read-only or not "
                              "yours); choose a folder you can write to.")


def check_stats_destination(path, overwrite: bool, reads: Iterable = (), out_dir=None) -> None:
    """Refuse a --save-stats path before calibration when writing it would lose data or fail: a
    folder, a file this job reads or inside its base model, a path inside the output folder, a
    missing or read-only parent, an existing file that is not statistics, or any existing file
    without `overwrite`."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"--save-stats {str(path)!r} is a folder; give a file path such as stats.safetensors.")
    for source in reads:
        if source is not None and Path(source).exists() and _holds(Path(source), path):
            raise CheckpointError(f"--save-stats {str(path)!r} would overwrite {str(source)!r}, which this job reads; "
                                  "choose another file.")
    if out_dir is not None and _holds(Path(out_dir), path):
        raise CheckpointError(f"--save-stats {str(path)!r} lies inside the output folder {str(out_dir)!r}, which is "
                              "written as a whole; put the statistics beside it.")
    if not path.parent.is_dir():
        raise CheckpointError(f"--save-stats {str(path)!r}: folder {str(path.parent)!r} does not exist; create it "
                              "first.")
    if not os.access(path.parent, os.W_OK):
        raise CheckpointError(f"--save-stats {str(path)!r}: folder {str(path.parent)!r} is not writable.")
    if path.exists() and not is_stats_file(path):
        raise CheckpointError(f"--save-stats {str(path)!r} exists and is not an optimum-grape statistics file; it is "
                              "never replaced. Choose another file.")
    if path.exists() and not overwrite:
        raise CheckpointError(f"--save-stats {str(path)!r} exists; pass --overwrite to replace it or choose another "
                              "file.")


def check_free_space(out_dir, base, ratio: float | None) -> None:
    """Refuse before any work when the output cannot fit: pruning removes at most `ratio` of the
    base's weights, so the checkpoint needs at least (1 - ratio) x the base's weight files (it is
    staged beside `out_dir` before it replaces anything)."""
    import shutil

    if ratio is None or base is None or not Path(base).is_dir():
        return
    needed = (1.0 - ratio) * sum(p.stat().st_size for p in Path(base).glob("*.safetensors") if p.is_file())
    free = shutil.disk_usage(_nearest_existing(Path(out_dir).absolute().parent)).free
    if free < needed:
        raise CheckpointError(f"Output {str(out_dir)!r}: {free / 1e9:.2f} GB free on its disk, but the pruned checkpoint "
                              f"needs at least {needed / 1e9:.2f} GB ({1 - ratio:.0%} of the base's weight files). Free "
                              "some space or write elsewhere.")
