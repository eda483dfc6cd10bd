"""``distrnn generate``: sample from a language model (bytes, or token ids through a tokenizer),
streaming the state one step at a time."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional

import torch

from distrnn.checkpoint_files import CheckpointError, load_checkpoint_file
from distrnn.config import ConfigError, NetworkConfig, TaskSpec, coerce
from distrnn.denormals import flush_denormals
from distrnn.model import RecurrentModel


def model_from_checkpoint(ckpt: dict, path: str) -> RecurrentModel:
    """The trained network of a distrnn checkpoint, built from its hyperparameters without the
    training module (and without Lightning)."""
    hp = ckpt.get("hyper_parameters")
    if not isinstance(hp, dict) or not isinstance(hp.get("network"), dict) or not isinstance(hp.get("task"), dict):
        raise CheckpointError(f"checkpoint {path}: no hyper_parameters with a network and a task: not a distrnn checkpoint")
    try:
        model = RecurrentModel(coerce(NetworkConfig, hp["network"]), coerce(TaskSpec, hp["task"]))
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {path}: its hyperparameters do not build a network: {e}") from None
    weights = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path}: its weights do not fit its network: {str(e).strip().splitlines()[0]}") from None
    return model.eval()


def load_model(path: str) -> RecurrentModel:
    """The network of the distrnn checkpoint file at ``path`` (or one ``distrnn convert-checkpoint`` wrote)."""
    return model_from_checkpoint(load_checkpoint_file(path), path)


def load_registered(uri: str) -> RecurrentModel:
    """The RecurrentModel of a model in the MLflow registry (``models:/NAME/VERSION``)."""
    import mlflow

    from distrnn.runs import check_store_exists

    check_store_exists()
    try:
        return mlflow.pytorch.load_model(uri, map_location="cpu").model.eval()
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"model {uri}: cannot be loaded: {first}") from None


@torch.no_grad()
def sample(module: Any, prompt_ids: list[int], length: int, temperature: float = 1.0, top_k: Optional[int] = None,
           seed: int = 0) -> list[int]:
    """``length`` ids sampled after ``prompt_ids`` (at least one), which stream through the model
    one step at a time, the way text would arrive."""
    model = getattr(module, "model", module)  # a RecurrentModel, or a training module around one
    g = torch.Generator().manual_seed(seed)
    state = None
    logits = None
    for i in prompt_ids:
        logits, state = model.step(torch.tensor([i]), state)
    out: list[int] = []
    for _ in range(length):
        z = logits[0].float() / max(temperature, 1e-6)
        if top_k:
            kth = torch.topk(z, min(top_k, z.numel())).values[-1]
            z = torch.where(z < kth, torch.full_like(z, float("-inf")), z)
        nxt = int(torch.multinomial(torch.softmax(z, -1), 1, generator=g))
        out.append(nxt)
        logits, state = model.step(torch.tensor([nxt]), state)
    return out


def generate(module: Any, prompt: bytes, length: int, temperature: float = 1.0, top_k: Optional[int] = None,
             seed: int = 0) -> bytes:
    """A byte-level model's continuation of ``prompt`` (empty: a line end)."""
    return bytes(sample(module, list(prompt or b"\n"), length, temperature, top_k, seed))


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="distrnn generate", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a distrnn checkpoint of a language model")
    src.add_argument("--model", help="a registered MLflow model, models:/NAME/VERSION")
    p.add_argument("--prompt", default="", help="text to condition on")
    p.add_argument("--length", type=int, default=200, help="bytes (tokens, with --tokenizer) to generate")
    p.add_argument("--tokenizer", default=None,
                   help="for a model of token ids (TokenFileDataModule): the tokenizer.json its data was made with")
    p.add_argument("--eot", default=None,
                   help="with --tokenizer: the end-of-text token that starts the text, as between documents in"
                        " training (default: the tokenizer's own; none: start from the prompt alone)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="divides the logits: lower is more conservative; 0 always takes the most probable")
    p.add_argument("--top_k", type=int, default=None, help="sample among the k most probable only (0 or unset: among all)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:  # as distrnn fit has it, before PyTorch starts its threads: a trained model's gates make them
        flush_denormals()  # (ValueError naming DISTRNN_DENORMALS for a bad value)
    except ValueError as e:
        return _error(str(e))
    if a.length < 0:
        p.error("--length must be >= 0")
    if not a.temperature >= 0:  # (NaN too) a negative one would favour the least probable
        p.error(f"--temperature must be >= 0, got {a.temperature}")
    if a.top_k is not None and a.top_k < 0:
        p.error(f"--top_k must be >= 0 (0: no cut), got {a.top_k}")
    try:
        model = load_model(a.checkpoint) if a.checkpoint else load_registered(a.model)
    except CheckpointError as e:
        print(f"distrnn: error: {e}", file=sys.stderr)
        return 2
    task = model.task
    source = a.checkpoint or a.model
    if task.kind != "language_model":
        return _error(f"{source}: a {task.kind} model, not a language model: generate writes text")
    if task.token_unit == "byte":
        if task.vocab_size != 256:
            return _error(f"{source}: a language model over {task.vocab_size} symbols, not bytes and not a"
                          " tokenizer's ids: generate has no text for them")
        if a.tokenizer or a.eot is not None:
            flag = "--tokenizer" if a.tokenizer else "--eot"
            return _error(f"{flag}: {source} is a byte-level model; it reads and writes bytes, without a tokenizer")
        text = generate(model, a.prompt.encode(), a.length, a.temperature, a.top_k, a.seed)
        sys.stdout.write(a.prompt + text.decode("utf-8", errors="replace") + "\n")
        return 0
    if not a.tokenizer:
        return _error(f"{source}: a language model over {task.vocab_size} token ids: pass --tokenizer, the"
                      " tokenizer.json its data was made with")
    from distrnn.data.tokenizer import TokenizerError, end_of_text, load_tokenizer, vocab_size

    try:
        tokenizer = load_tokenizer(a.tokenizer)
        if vocab_size(tokenizer) > task.vocab_size:
            raise TokenizerError(f"--tokenizer: {a.tokenizer} has {vocab_size(tokenizer)} tokens, more than the"
                                 f" {task.vocab_size} ids of {source}: is it the tokenizer its data was made with?")
        eot = end_of_text(tokenizer, a.eot) if a.eot is not None else _quiet_end_of_text(tokenizer)
    except TokenizerError as e:
        return _error(str(e))
    prompt_ids = ([] if eot is None else [eot]) + tokenizer.encode(a.prompt, add_special_tokens=False).ids
    if not prompt_ids:
        return _error("--prompt: empty, and the tokenizer has no end-of-text token to start from (--eot)")
    ids = sample(model, prompt_ids, a.length, a.temperature, a.top_k, a.seed)
    sys.stdout.write(a.prompt + tokenizer.decode(ids, skip_special_tokens=False) + "\n")
    return 0


def _quiet_end_of_text(tokenizer: Any) -> Optional[int]:
    from distrnn.data.tokenizer import TokenizerError, end_of_text

    try:
        return end_of_text(tokenizer, None)
    except TokenizerError:
        return None


def _error(message: str) -> int:
    print(f"distrnn: error: {message}", file=sys.stderr)
    return 2
