"""``distrnn tokenize``: text files to a flat file of token ids (what ``TokenFileDataModule``
reads), with a Hugging Face ``tokenizer.json``; and the tokenizer side of ``distrnn generate``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from distrnn.paths import unwritable_file

# what tokenizers commonly call their end-of-text token, tried in this order
END_OF_TEXT = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "[SEP]")


class TokenizerError(ValueError):
    """Bad tokenizer input, as one line naming the file or option."""


def load_tokenizer(path: str) -> Any:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise TokenizerError("--tokenizer needs the tokenizers package (pip install 'distrnn[tokenizers]')") from None
    if not Path(path).is_file():
        raise TokenizerError(f"--tokenizer: {path} is not a file (a Hugging Face tokenizer.json)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TokenizerError(f"--tokenizer: {path} is not a tokenizer.json: {first}") from None


def end_of_text(tokenizer: Any, name: Optional[str]) -> Optional[int]:
    """The id of the end-of-text token: ``name`` ("none": no such token), else the first of
    :data:`END_OF_TEXT` in the tokenizer's vocabulary."""
    if name is not None:
        if name.lower() == "none":
            return None
        found = tokenizer.token_to_id(name)
        if found is None:
            raise TokenizerError(f"--eot: {name!r} is not a token of this tokenizer")
        return int(found)
    for candidate in END_OF_TEXT:
        found = tokenizer.token_to_id(candidate)
        if found is not None:
            return int(found)
    raise TokenizerError(f"--eot: the tokenizer has none of {', '.join(END_OF_TEXT)}; name its end-of-text token,"
                         " or pass --eot none to join documents without one")


def vocab_size(tokenizer: Any) -> int:
    return int(tokenizer.get_vocab_size(with_added_tokens=True))


def _documents(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for name in inputs:
        p = Path(name)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts))
            if not found:
                raise TokenizerError(f"{name}: a folder without files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise TokenizerError(f"{name}: no such file or folder")
    return files


def _cut(data: bytes) -> int:
    """Where to end a piece of ``data``: after its last line end that stands alone between two
    characters that are not white space, the place where the pre-tokenizers of GPT-2, Llama 3 and
    the like always split ("a\\nb" is "a", "\\n", "b"; a run such as "\\n\\n" or "\\r\\n" splits
    otherwise at a piece's end than inside the text); 0 when there is none."""
    i = len(data) - 1
    while (i := data.rfind(b"\n", 1, i)) > 0:
        if not data[i + 1:i + 2].isspace() and not data[i - 1:i].isspace():
            return i + 1
    return 0


# texts with a place to cut (:func:`_cut`) that tokenizers treat in different ways
_PROBES = ("the cat sat\non a mat", "x = f(1).\nY += 2", "12\n345", "naïve\ncafé ✓", "a  b\nc\td\n\ne\nf")


def cuts_are_exact(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` encodes the two sides of a cut as it encodes the whole, probed on a
    few texts. Byte-level BPE tokenizers (GPT-2's, Llama 3's) do; one that marks the start of
    every text (SentencePiece's Metaspace, a ``Prepend`` normalizer) does not."""
    def ids(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False).ids

    for text in _PROBES:
        data = text.encode("utf-8")
        cut = _cut(data)
        if ids(text) != ids(data[:cut].decode("utf-8")) + ids(data[cut:].decode("utf-8")):
            return False
    return True


def _pieces(path: Path, piece_bytes: Optional[int]) -> Iterator[str]:
    """The text of ``path`` in pieces of about ``piece_bytes`` (:func:`_cut`), so that the pieces'
    ids are the whole file's; text without such a place (one long line, or only "\\r\\n" line
    ends) is read on until one comes, or whole. ``piece_bytes`` None: the whole file."""
    if piece_bytes is None:
        yield _text(path.read_bytes(), path, 0)
        return
    with open(path, "rb") as f:
        rest, at = b"", 0
        while chunk := f.read(piece_bytes):
            data = rest + chunk
            cut = _cut(data)
            if cut == 0:  # no such place yet: read on
                rest = data
                continue
            piece, rest = data[:cut], data[cut:]
            yield _text(piece, path, at)
            at += len(piece)
        if rest:
            yield _text(rest, path, at)


def _text(piece: bytes, path: Path, at: int) -> str:
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not UTF-8 text (byte {at + e.start})") from None


def tokenize_files(tokenizer: Any, files: list[Path], out: Any, dtype: np.dtype, eot: Optional[int],
                   piece_bytes: Optional[int] = 1 << 20, batch: int = 64) -> tuple[int, int]:
    """Writes every file's ids, each followed by ``eot``, to the binary file ``out``; returns
    (tokens, documents). The tokenizer's own special tokens (BOS, CLS) are not added; pieces are
    encoded ``batch`` at a time, which the tokenizer spreads over its threads. A tokenizer that
    would encode the pieces otherwise than the whole (:func:`cuts_are_exact`) gets whole files."""
    if piece_bytes is not None and not cuts_are_exact(tokenizer):
        print("distrnn tokenize: this tokenizer encodes the start of a text differently (as SentencePiece's"
              " Metaspace does): each file is encoded whole, in memory", file=sys.stderr)
        piece_bytes = None
    tokens = 0
    pending: list[str] = []

    def flush() -> None:
        nonlocal tokens
        if pending:
            for enc in tokenizer.encode_batch(pending, add_special_tokens=False):
                ids = np.asarray(enc.ids, dtype=dtype)
                ids.tofile(out)
                tokens += len(ids)
            pending.clear()

    for path in files:
        for piece in _pieces(path, piece_bytes):
            pending.append(piece)
            if len(pending) >= batch:
                flush()
        flush()
        if eot is not None:
            np.asarray([eot], dtype=dtype).tofile(out)
            tokens += 1
    return tokens, len(files)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(
        prog="distrnn tokenize",
        description="Text files (UTF-8) to one flat file of token ids, each file a document followed by the"
                    " end-of-text id, with a Hugging Face tokenizer.json: the file that data.class_path"
                    " distrnn.data.TokenFileDataModule trains on. Prints the data settings for it.")
    p.add_argument("inputs", nargs="+", help="text files (UTF-8), or folders of them: each file one document")
    p.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizer.json (e.g. GPT-2's)")
    p.add_argument("--output", required=True, help="the file of token ids to write")
    p.add_argument("--eot", default=None,
                   help="the end-of-text token written after each document (default: the tokenizer's own,"
                        f" one of {', '.join(END_OF_TEXT)}); none: no separator")
    p.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    a = p.parse_args(argv)
    out = Path(a.output)
    try:
        tokenizer = load_tokenizer(a.tokenizer)
        eot = end_of_text(tokenizer, a.eot)
        files = _documents(a.inputs)
        why = unwritable_file(a.output, "the token ids", "tokens.bin")
        if why:  # a folder failed when the finished file was moved there, after tokenizing everything
            raise TokenizerError(f"--output: {why}")
        if out.exists() and not a.overwrite:
            raise TokenizerError(f"--output: {out} exists (--overwrite replaces it)")
        if out.resolve() in {f.resolve() for f in files}:
            raise TokenizerError(f"--output: {out} is one of the inputs")
        vocab = vocab_size(tokenizer)
        dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                n, docs = tokenize_files(tokenizer, files, f, dtype, eot)
            os.replace(tmp, out)  # an interrupted run leaves the previous file, never half of one
        finally:
            tmp.unlink(missing_ok=True)
    except TokenizerError as e:
        print(f"distrnn: error: {e}", file=sys.stderr)
        return 2
    eot_arg = "" if eot is None else f", eot_token: {eot}"
    print(f"wrote {out}: {n} tokens of {docs} documents ({dtype.name}, vocabulary {vocab}"
          f"{'' if eot is None else f', end-of-text id {eot}'}); train on it with\n"
          f"data:\n  class_path: distrnn.data.TokenFileDataModule\n"
          f"  init_args: {{path: {out}, vocab_size: {vocab}, dtype: {dtype.name}{eot_arg}}}")
    return 0
