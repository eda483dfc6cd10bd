"""``distrnn tokenize`` and ``distrnn generate --tokenizer``: text to token ids to a trained model
and back to text, with a byte-level BPE tokenizer trained here (no download)."""

from pathlib import Path

import numpy as np
import pytest

from conftest import cli, write_corpus

tokenizers = pytest.importorskip("tokenizers")

DOCS = {
    "a.txt": "the cat sat on a mat.\nthe rnn learns long streams\n",
    "b/c.txt": "naïve café ✓ — non-ASCII text\n\nwith a blank line and no final line end",
    "b/d.txt": "x" * 300,  # one long line: one piece, however small the pieces
    # blank lines and indents, whose pre-tokens a cut at any line end would change
    "b/e.py": "def f(x):\n    return x\n\n\nclass A:\n\n    pass\nA = 1\r\nB = 2\n" * 12,
}


def _train_tokenizer(path: Path, text: str, vocab: int = 300) -> "tokenizers.Tokenizer":
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer)
    tok.save(str(path))
    return tok


def _docs(root: Path) -> list[Path]:
    for name, text in DOCS.items():
        (root / "docs" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "docs" / name).write_text(text, encoding="utf-8")
    return [root / "docs" / name for name in sorted(DOCS)]


def test_tokenize_writes_each_document_then_end_of_text_and_refuses_bad_input(tmp_path, capsys):
    """The ids of every file of the folder (sorted), each followed by the end-of-text id: equal to
    the tokenizer's own encoding of each whole file, and decoded back to the text, also when the
    files are encoded in pieces of 64 bytes (cut where the pre-tokenizer splits). Bad input is one
    line, exit 2, and an existing output is left as it was."""
    from distrnn.data.tokenizer import tokenize_files

    tok = _train_tokenizer(tmp_path / "tok.json", write_corpus(tmp_path / "c.txt", 20_000).read_text() + DOCS["b/e.py"])
    eot = tok.token_to_id("<|endoftext|>")
    files = _docs(tmp_path)
    code, out, err = cli(capsys, "tokenize", "docs", "--tokenizer", "tok.json", "--output", "data/train.bin")
    assert code == 0, err
    ids = np.fromfile("data/train.bin", dtype=np.uint16)
    # read as bytes: read_text() would turn the "\r\n" into "\n"
    expected = [i for f in files for i in tok.encode(f.read_bytes().decode(), add_special_tokens=False).ids + [eot]]
    assert ids.tolist() == expected
    vocab = tok.get_vocab_size()
    assert f"init_args: {{path: data/train.bin, vocab_size: {vocab}, dtype: uint16, eot_token: {eot}}}" in out
    assert f"{len(expected)} tokens of {len(files)} documents" in out

    with open(tmp_path / "pieces.bin", "wb") as f:
        n, docs = tokenize_files(tok, files, f, np.dtype(np.uint16), eot, piece_bytes=64, batch=3)
    pieces = np.fromfile(tmp_path / "pieces.bin", dtype=np.uint16)
    assert (n, docs) == (len(pieces), len(files)) and pieces.tolist() == expected
    assert tok.token_to_id("ĊĊ") in expected  # a blank line's merge, which a cut there could break
    ends = np.flatnonzero(pieces == eot)
    texts = [tok.decode(d.tolist()) for d in np.split(pieces, ends + 1)[:-1]]
    assert [t.removesuffix("<|endoftext|>") for t in texts] == [f.read_bytes().decode() for f in files]

    before = Path("data/train.bin").read_bytes()
    (tmp_path / "docs" / "bad.txt").write_bytes(b"fine\n\xff not utf-8\n")
    bad = [
        (["docs", "--tokenizer", "tok.json", "--output", "data/train.bin"], "--output: data/train.bin exists (--overwrite replaces it)"),
        (["docs", "--tokenizer", "tok.json", "--output", "data/train.bin", "--overwrite"], "bad.txt: not UTF-8 text (byte 5)"),
        # before reading the inputs (a folder: found after tokenizing them all, a traceback)
        (["docs", "--tokenizer", "tok.json", "--output", "data", "--overwrite"],
         "--output: data is a folder: name the file to write, e.g. data/tokens.bin"),
        (["docs", "--tokenizer", "tok.json", "--output", "data/train.bin/x.bin"],
         "--output: data/train.bin is not a folder (the token ids would go to data/train.bin/x.bin)"),
        (["docs", "--tokenizer", "nope.json", "--output", "x.bin"], "--tokenizer: nope.json is not a file"),
        (["docs", "--tokenizer", "c.txt", "--output", "x.bin"], "--tokenizer: c.txt is not a tokenizer.json"),
        (["docs", "--tokenizer", "tok.json", "--output", "x.bin", "--eot", "<nope>"], "--eot: '<nope>' is not a token"),
        (["missing", "--tokenizer", "tok.json", "--output", "x.bin"], "missing: no such file or folder"),
    ]
    for args, message in bad:
        code, _, err = cli(capsys, "tokenize", *args)
        assert code == 2 and message in err and err.count("\n") == 1, (args, err)
    assert Path("data/train.bin").read_bytes() == before
    assert not list(Path("data").glob(".*.tmp")) and not Path("x.bin").exists()


def test_a_tokenizer_that_marks_each_texts_start_gets_whole_files(tmp_path, capsys):
    """SentencePiece's Metaspace marks the start of every text it encodes: cut into pieces, a file
    would get a marker at each cut. Such a tokenizer is found out by a probe and gets whole files
    (said on stderr): the ids equal its own encoding of each file; byte-level BPE keeps its pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from distrnn.data.tokenizer import cuts_are_exact, tokenize_files

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.train_from_iterator([write_corpus(tmp_path / "c.txt", 20_000).read_text() + DOCS["b/e.py"]],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    files = _docs(tmp_path)
    assert not cuts_are_exact(tok) and cuts_are_exact(_train_tokenizer(tmp_path / "bpe.json", "the cat sat\n"))
    with open(tmp_path / "ids.bin", "wb") as f:
        tokenize_files(tok, files, f, np.dtype(np.uint16), None, piece_bytes=64)
    ids = np.fromfile(tmp_path / "ids.bin", dtype=np.uint16).tolist()
    assert ids == [i for f in files for i in tok.encode(f.read_bytes().decode(), add_special_tokens=False).ids]
    assert "each file is encoded whole" in capsys.readouterr().err


@pytest.mark.slow
def test_a_tokenized_corpus_trains_and_generates_text_through_its_tokenizer(tmp_path, capsys):
    """tokenize -> fit (TokenFileDataModule with the printed settings) -> generate --tokenizer:
    the prompt, after the end-of-text id that starts every training document, streams through
    the model and the sampled ids come back as text, the same as sampling by hand; the same seed
    gives the same text. A byte model, a tokenizer larger than the model's vocabulary, or a token
    model without a tokenizer are refused in one line."""
    import torch

    from distrnn.generate import load_model, sample

    text = write_corpus(tmp_path / "c.txt", 30_000).read_text()
    tok = _train_tokenizer(tmp_path / "tok.json", text)
    eot = tok.token_to_id("<|endoftext|>")
    for i, part in enumerate(text.split("streams\n")):
        (tmp_path / "docs" / f"{i:03d}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "docs" / f"{i:03d}.txt").write_text(part + "streams\n")
    code, out, err = cli(capsys, "tokenize", "docs", "--tokenizer", "tok.json", "--output", "train.bin")
    assert code == 0, err
    data = out[out.index("data:"):]
    Path("job.yaml").write_text(f"""
seed_everything: 0
trainer: {{max_steps: 30, limit_val_batches: 1, val_check_interval: 15, enable_progress_bar: false, enable_model_summary: false}}
model:
  network: {{recurrence: gru, hidden_size: 32}}
  tbptt: {{k1: 16}}
  optimizer: {{lr: 0.01}}
{data.rstrip().removesuffix("}")}, batch_size: 4, seq_len: 32}}
""")
    code, _, err = cli(capsys, "fit", "--config", "job.yaml")
    assert code == 0, err[-3000:]
    (ckpt,) = Path("checkpoints").rglob("last.ckpt")
    args = ["generate", "--checkpoint", str(ckpt), "--tokenizer", "tok.json", "--prompt", "the cat", "--length", "12", "--seed", "3"]
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    prompt = [eot] + tok.encode("the cat", add_special_tokens=False).ids
    torch.manual_seed(123)  # sampling uses its own generator, not the global one
    by_hand = sample(load_model(str(ckpt)), prompt, 12, temperature=0.8, seed=3)
    assert out == "the cat" + tok.decode(by_hand, skip_special_tokens=False) + "\n"
    assert cli(capsys, *args)[1] == out

    _train_tokenizer(tmp_path / "big.json", text + "".join(chr(0x4E00 + i) for i in range(400)), vocab=700)
    code, _, err = cli(capsys, "generate", "--checkpoint", str(ckpt), "--tokenizer", "big.json")
    assert code == 2 and "big.json has" in err and "is it the tokenizer its data was made with?" in err, err
    code, _, err = cli(capsys, "generate", "--checkpoint", str(ckpt))
    assert code == 2 and "pass --tokenizer" in err and err.count("\n") == 1, err
