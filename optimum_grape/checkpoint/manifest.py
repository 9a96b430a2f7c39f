"""`grape_manifest.json`: the SHA-256 and size of every weight file of a checkpoint optimum-grape
wrote, and the check of a folder against it (`optimum-grape inspect --verify`).

safetensors has no checksum, so a flipped byte in a weight file loads silently; the manifest is
how a copy, a download or an old disk is checked. It covers the weight files (`*.safetensors` and
their index) only: config, tokenizer and the model card may be edited by hand.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import CheckpointError

MANIFEST_FILE = "grape_manifest.json"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and
                  (p.name.endswith(".safetensors") or p.name.endswith(".safetensors.index.json")))


def write_manifest(folder) -> None:
    folder = Path(folder)
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in weight_files(folder)}
    # Every other file optimum-grape wrote, by name: what `overwrite` may replace (destinations.py).
    written = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in files)
    text = json.dumps({"algorithm": "sha256", "files": files, "written": written}, indent=2, sort_keys=True) + "\n"
    (folder / MANIFEST_FILE).write_text(text, encoding="utf-8")


def written_names(folder: Path) -> set[str] | None:
    """The names of every file optimum-grape wrote into `folder` (weights, manifest and the rest), or
    None when its manifest is missing, damaged or older than this list."""
    try:
        data = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
        names = set(data["files"]) | set(data["written"]) | {MANIFEST_FILE}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return None
    return names if all(isinstance(n, str) for n in names) else None


def read_manifest(folder: Path) -> dict[str, dict]:
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"{str(folder)!r} has no {MANIFEST_FILE}: it was not written by optimum-grape, or by a "
                              "version before checksums; nothing to verify against.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
        ok = data.get("algorithm") == "sha256" and isinstance(files, dict) and all(
            isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
            and Path(k).name == k for k, v in files.items())
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        ok = False
    if not ok:
        raise CheckpointError(f"{path} is malformed (expected {{'algorithm': 'sha256', 'files': {{name: {{'sha256', "
                              "'bytes'}}}}}}); it was edited or damaged.")
    return files


def verify_folder(folder) -> tuple[list[str], list[str]]:
    """(names verified, problems): a listed file missing or with another size or SHA-256, or a
    weight file the manifest does not list."""
    folder = Path(folder)
    expected = read_manifest(folder)
    problems, verified = [], []
    for name, entry in sorted(expected.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{name}: {path.stat().st_size} bytes, the manifest says {entry['bytes']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{name}: SHA-256 mismatch (the file was changed or damaged)")
        else:
            verified.append(name)
    problems += [f"{p.name}: not listed in {MANIFEST_FILE}" for p in weight_files(folder) if p.name not in expected]
    if not any(name.endswith(".safetensors") for name in expected):
        problems.append(f"{MANIFEST_FILE} lists no weight file (*.safetensors): nothing here could be verified")
    return verified, problems
