"""`grape_manifest.json`: the SHA-256 and size of every weight file of a checkpoint optimum-grape
wrote, and the check of a folder against it (`optimum-grape inspect --verify`).

safetensors has no checksum, so a flipped byte in a weight file loads silently; the manifest is
how a copy, a download or an old disk is checked. It covers the weight files (`*.safetensors` and
their index) only: config, tokenizer and the model card may be edited by hand.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ..errors import CheckpointError

MANIFEST_FILE = "grape_manifest.json"
_CHUNK = 1 << 20


def _read_sha256(path: Path) -> str:
    return _sha256_of(open(path, "rb"))


def _sha256_of(handle) -> str:
    """SHA-256 of an open file's bytes; closes it."""
    digest = hashlib.sha256()
    with handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


# Files whose hashing started while the rest of the checkpoint was still being written, by identity
# (device, inode, size, mtime): a rename keeps it, any rewrite changes it.
_AHEAD: dict[tuple, Future] = {}
_AHEAD_POOL: list[ThreadPoolExecutor] = []


def _identity(path: Path) -> tuple:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def hash_ahead(path: Path) -> None:
    """Start hashing a finished weight file on a background thread while the next one is written:
    `sha256_file` on the same file, renamed or not, then waits for that digest instead of reading the
    file again. hashlib and reads release the GIL, so this overlaps with writing."""
    if not _AHEAD_POOL:
        _AHEAD_POOL.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="grape-sha256"))
    handle = open(path, "rb")  # opened here, not on the thread: the writer may rename the file next
    _AHEAD[_identity(path)] = _AHEAD_POOL[0].submit(_sha256_of, handle)


def sha256_file(path: Path) -> str:
    ahead = _AHEAD.pop(_identity(path), None)
    return ahead.result() if ahead is not None else _read_sha256(path)


def sha256_files(paths: list[Path]) -> list[str]:
    """`sha256_file` of each path, several files at once: hashlib and file reads release the GIL, so
    threads hash a sharded checkpoint's files in parallel (a 1.2 GB checkpoint takes ~0.9 s on one core)."""
    workers = max(1, min(len(paths), os.cpu_count() or 1, 8))
    if workers == 1:
        return [sha256_file(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(sha256_file, paths))


def weight_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and
                  (p.name.endswith(".safetensors") or p.name.endswith(".safetensors.index.json")))


def write_manifest(folder) -> None:
    folder = Path(folder)
    paths = weight_files(folder)
    files = {p.name: {"sha256": digest, "bytes": p.stat().st_size} for p, digest in zip(paths, sha256_files(paths))}
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
    problems, verified, to_hash = [], [], []
    for name, entry in sorted(expected.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{name}: {path.stat().st_size} bytes, the manifest says {entry['bytes']}")
        else:
            to_hash.append(name)
    for name, digest in zip(to_hash, sha256_files([folder / name for name in to_hash])):
        if digest != expected[name]["sha256"]:
            problems.append(f"{name}: SHA-256 mismatch (the file was changed or damaged)")
        else:
            verified.append(name)
    problems.sort()  # by file name, as the manifest lists them
    problems += [f"{p.name}: not listed in {MANIFEST_FILE}" for p in weight_files(folder) if p.name not in expected]
    if not any(name.endswith(".safetensors") for name in expected):
        problems.append(f"{MANIFEST_FILE} lists no weight file (*.safetensors): nothing here could be verified")
    return verified, problems
