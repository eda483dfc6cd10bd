"""Public corpora, fetched only when asked for, verified by SHA-256 and cached.

The digest is that of the extracted payload, not of the archive: mirrors re-pack the archives
from time to time, while the 10^8 bytes of enwik8 never change.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass(frozen=True)
class Corpus:
    url: str
    member: Optional[str]  # file inside a zip archive, or None for a plain file
    sha256: str
    filename: str


CORPORA: dict[str, Corpus] = {
    "enwik8": Corpus(
        "http://mattmahoney.net/dc/enwik8.zip", "enwik8",
        "2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8", "enwik8",
    ),
    "text8": Corpus(
        "http://mattmahoney.net/dc/text8.zip", "text8",
        "6e890197040d37d85beb962ae1f041ff1d9a9ca8d20c7d99c85027eebf51dca7", "text8",
    ),
    "tiny_shakespeare": Corpus(
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt", None,
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", "tiny_shakespeare.txt",
    ),
}


class DownloadError(RuntimeError):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_corpus(name: str, cache_dir: str | os.PathLike, corpus: Optional[Corpus] = None) -> Path:
    """Return the cached, verified corpus file; download it first if it is missing.

    A cached file whose digest is wrong is fetched again; a download whose digest is wrong is
    refused and nothing is left in the cache.
    """
    spec = corpus or CORPORA[name]
    cache = Path(cache_dir)
    target = cache / spec.filename
    if target.exists() and sha256_file(target) == spec.sha256:
        return target
    cache.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(spec.url, timeout=60) as response:
            raw = response.read()
    except OSError as e:
        raise DownloadError(f"{name}: cannot download {spec.url}: {e}") from None
    if spec.member is not None:
        try:
            with zipfile.ZipFile(io.BytesIO(raw)) as z:
                raw = z.read(spec.member)
        except (zipfile.BadZipFile, KeyError) as e:
            raise DownloadError(f"{name}: {spec.url} is not a zip holding {spec.member}: {e}") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != spec.sha256:
        raise DownloadError(f"{name}: SHA-256 of {spec.url} is {digest}, expected {spec.sha256}; nothing was cached")
    tmp = target.with_suffix(target.suffix + ".part")
    tmp.write_bytes(raw)
    os.replace(tmp, target)
    return target


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="distrnn download", description="Fetch and verify a public corpus.")
    p.add_argument("name", choices=sorted(CORPORA))
    p.add_argument("--cache_dir", default="data_cache")
    a = p.parse_args(argv)
    try:
        path = fetch_corpus(a.name, a.cache_dir)
    except DownloadError as e:
        print(f"distrnn: error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


