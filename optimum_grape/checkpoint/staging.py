"""Atomic writing: a file or folder is written under a hidden staging name beside its target and
moved into place only when complete, so an interrupted job never leaves half a checkpoint or half a
statistics file. Owns the staging names and the removal of those a crashed run left behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
from pathlib import Path

logger = logging.getLogger("optimum_grape")
# `.{name}.partial-{pid}-{host}-{random}` while a save is written, `.{name}.old-{pid}-{host}` while an
# overwritten checkpoint is swapped out, `.{name}.scratch-{pid}-{host}-{random}` while a layer-by-layer
# job keeps its converted layers (`layerwise/scratch.py`); the owner's pid and host say when one is stale.
_STAGING = re.compile(
    r"^\.(?P<name>.+)\.(?P<kind>partial|old|scratch)-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})(?:-[0-9a-f]{8})?$")


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def staging_path(target: Path, kind: str) -> Path:
    """A hidden sibling of `target` owned by this process: kind 'partial' (being written), 'old' or
    'scratch' (a layer-by-layer job's converted layers)."""
    suffix = f"-{secrets.token_hex(4)}" if kind in ("partial", "scratch") else ""
    return target.with_name(f".{target.name}.{kind}-{os.getpid()}-{_host()}{suffix}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def clean_stale_staging(target: Path) -> None:
    """Remove the staging entries of `target` that a process on this host left when it died. Only
    names this module creates, only when their process is gone; an '.old' checkpoint is kept while
    `target` itself is missing (it is then the only copy)."""
    if os.name != "posix" or not target.parent.is_dir():
        return  # os.kill(pid, 0) probes a process only on POSIX
    for entry in target.parent.iterdir():
        match = _STAGING.match(entry.name)
        if match is None or match["name"] != target.name or match["host"] != _host() or entry.is_symlink():
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or _alive(pid):
            continue
        if match["kind"] == "old" and not target.exists():
            logger.warning("%s holds what was at %s before process %d stopped while replacing it; kept: move it back "
                           "or delete it.", entry, target, pid)
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        logger.info("Removed %s, left by process %d, which is no longer running.", entry, pid)


def make_staging_folder(out_dir: Path) -> Path:
    """The folder a checkpoint is written into before it is moved to `out_dir`. Created like any
    folder (mode 0o777 minus the umask), not 0700 as `tempfile.mkdtemp` would."""
    clean_stale_staging(out_dir)
    staging = staging_path(out_dir, "partial")
    staging.mkdir()
    return staging
