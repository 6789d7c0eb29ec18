"""Corpus for the demo models: public-domain English novels from Debian packages, read offline.

Sources (Debian bookworm, both MIT-licensed packages whose texts are public domain):
  r-cran-janeaustenr  Jane Austen's six novels (Project Gutenberg texts), one line per element
  r-cran-tokenizers   Herman Melville's "Moby Dick" (the package's example data set)

Both keep their texts in R lazy-load databases (data/Rdata.rdb + .rdx).  R is not needed: the
small reader below understands the parts of R's XDR serialization those files use.

    python benchmarks/demo_corpus.py --out .demo/corpus     # downloads the .debs with apt-get

Documents are chapters; every TEST_EVERY-th chapter of each book is held out as the test split
and every VALID_EVERY-th (offset 1) as the validation split, so both cover every book while never
sharing a chapter with training.
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import json
import lzma
import re
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

PACKAGES = {
    "r-cran-janeaustenr": "usr/lib/R/site-library/janeaustenr/data/Rdata",
    "r-cran-tokenizers": "usr/lib/R/site-library/tokenizers/data/Rdata",
}
BOOKS = {  # R object name -> title
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
    "mobydick": "Moby Dick",
}
TEST_EVERY = 5
VALID_EVERY = 10  # validation chapters pick the checkpoint; test chapters only report


def split_of(i: int) -> str:
    if i % TEST_EVERY == TEST_EVERY - 1:
        return "test"
    return "valid" if i % VALID_EVERY == 1 else "train"


# ---------------------------------------------------------------- R serialization (XDR) reader
class _RReader:
    """Decode R's 'X' (big-endian XDR) serialization: enough for character vectors and lists."""

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError("not an XDR R serialization stream")
        self.b, self.p, self.refs = data, 2, []
        version = self._int()
        self._int(), self._int()
        if version == 3:
            n = self._int()  # native encoding name
            self.p += n

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.p)
        self.p += 4
        return v

    def _chars(self):
        n = self._int()
        if n == -1:
            return None
        s = self.b[self.p : self.p + n]
        self.p += n
        return s.decode("utf-8", errors="replace")

    def read(self):
        flags = self._int()
        t, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if t in (254, 253, 252, 251, 250, 242, 241):  # NULL, envs, markers
            return None
        if t == 255:  # reference to an earlier symbol/environment
            idx = flags >> 8
            return self.refs[(idx if idx else self._int()) - 1]
        if t == 1:  # SYMSXP
            self.refs.append(None)
            self.refs[-1] = name = self.read()
            return name
        if t == 9:  # CHARSXP
            return self._chars()
        if t in (2, 6, 239, 240):  # pairlist / call: attr, tag, car, cdr
            out = {}
            while True:
                if has_attr:
                    self.read()
                tag = self.read() if has_tag else None
                out[tag if tag is not None else len(out)] = self.read()
                flags = self._int()
                t, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
                if t == 254:
                    return out
                if t not in (2, 6, 239, 240):
                    raise ValueError(f"unsupported pairlist tail type {t}")
        if t == 4:  # ENVSXP: keep placeholder in ref table, skip body
            self.refs.append({})
            self._int()
            for _ in range(4):
                self.read()
            return {}
        if t in (10, 13):
            n = self._int()
            v = list(struct.unpack_from(f">{n}i", self.b, self.p))
            self.p += 4 * n
        elif t == 14:
            n = self._int()
            v = list(struct.unpack_from(f">{n}d", self.b, self.p))
            self.p += 8 * n
        elif t == 16:  # STRSXP
            v = [self.read() for _ in range(self._int())]
        elif t in (19, 20):  # VECSXP / EXPRSXP
            v = [self.read() for _ in range(self._int())]
        else:
            raise ValueError(f"unsupported R SEXP type {t}")
        if has_attr:
            attrs = self.read()
            if isinstance(attrs, dict) and "names" in attrs and t == 19:
                return dict(zip(attrs["names"], v))
        return v


def _decompress(blob: bytes) -> bytes:
    # 4-byte big-endian length, then zlib (classic) or a type byte + bzip2/xz/none stream
    (n,) = struct.unpack_from(">I", blob, 0)
    kind, body = blob[4:5], blob[4:]
    if kind == b"X":
        out = lzma.decompress(body[1:])
    elif kind == b"2":
        out = bz2.decompress(body[1:])
    elif kind == b"0":
        out = body[1:]
    else:
        out = zlib.decompress(body[1:] if kind == b"Z" else body)
    if len(out) != n:
        raise ValueError("R lazy-load record has the wrong length")
    return out


def read_lazyload(prefix: Path) -> dict:
    """All objects of an R lazy-load database (prefix.rdx index + prefix.rdb records)."""
    index = _RReader(gzip.decompress(prefix.with_suffix(".rdx").read_bytes())).read()  # an .rds
    rdb = prefix.with_suffix(".rdb").read_bytes()
    out = {}
    for name, (off, length) in index["variables"].items():
        out[name] = _RReader(_decompress(rdb[int(off) : int(off) + int(length)])).read()
    return out


# ---------------------------------------------------------------- chapters
_CHAPTER = re.compile(r"^\s*(CHAPTER|Chapter)\s+[0-9IVXLC]+\b|^\s*CHAPTER\s+\d+\.")


def chapters(lines: list[str]) -> list[str]:
    """Split a book's lines at chapter headings; paragraphs are re-joined into single lines."""
    docs, cur = [], []
    for line in lines:
        line = line or ""
        if _CHAPTER.match(line) and cur:
            docs.append(cur)
            cur = []
        cur.append(line)
    docs.append(cur)
    out = []
    for doc in docs:
        paras, para = [], []
        for line in doc:
            if line.strip():
                para.append(line.strip())
            elif para:
                paras.append(" ".join(para))
                para = []
        if para:
            paras.append(" ".join(para))
        text = "\n".join(paras).replace("_", "")  # Gutenberg's _italics_ markers
        if len(text) > 200:
            out.append(text)
    return out


def package_versions(names) -> dict:
    out = {}
    for name in names:
        v = subprocess.run(["apt-cache", "show", "--no-all-versions", name], capture_output=True,
                           text=True, check=True).stdout
        out[name] = re.search(r"^Version: (.+)$", v, re.M).group(1)
    return out


def build(out_dir: Path, deb_dir: Path | None = None) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if deb_dir is None:
            subprocess.run(["apt-get", "download", *PACKAGES], cwd=tmp, check=True,
                           capture_output=True)
            deb_dir = tmp
        objects = {}
        for pkg, prefix in PACKAGES.items():
            deb = sorted(Path(deb_dir).glob(f"{pkg}_*.deb"))[-1]
            subprocess.run(["dpkg", "-x", str(deb), str(tmp / pkg)], check=True)
            objects.update(read_lazyload(tmp / pkg / prefix))
    parts, stats = {"train": [], "valid": [], "test": []}, {}
    for key, title in BOOKS.items():
        lines = objects[key]
        if len(lines) == 1:  # Moby Dick is one string with Project Gutenberg's header and licence
            text = lines[0].lstrip("\ufeff")
            text = text.split("*** START OF", 1)[-1].split("\n", 1)[1].split("*** END OF", 1)[0]
            text = text.split("End of Project Gutenberg", 1)[0]
            lines = text.replace("\r\n", "\n").split("\n")
        docs = chapters(lines)
        split = [split_of(i) for i in range(len(docs))]
        for d, sp in zip(docs, split):
            parts[sp].append(d)
        stats[title] = {"chapters": len(docs), "test_chapters": split.count("test"),
                        "valid_chapters": split.count("valid"), "chars": sum(map(len, docs))}
    for sp, docs in parts.items():
        (out_dir / f"{sp}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    meta = {"packages": package_versions(PACKAGES), "licence": "texts public domain; packages MIT",
            "books": stats, **{f"{sp}_docs": len(d) for sp, d in parts.items()},
            "split": f"chapter i of each book: test if i % {TEST_EVERY} == {TEST_EVERY - 1}, "
                     f"valid if i % {VALID_EVERY} == 1, else train"}
    (out_dir / "corpus.json").write_text(json.dumps(meta, indent=1))
    return meta


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(".demo/corpus"))
    ap.add_argument("--debs", type=Path, default=None, help="folder with the .deb files already")
    a = ap.parse_args()
    print(json.dumps(build(a.out, a.debs), indent=1))
