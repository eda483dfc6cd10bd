"""``distrnn generate``: sample from a byte-level model, streaming the state one step at a time."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional

import torch

from distrnn.checkpoint import CheckpointError, load_checkpoint_file
from distrnn.engine import TBPTTModule


def module_from_checkpoint(ckpt: dict, path: str) -> TBPTTModule:
    hp = ckpt.get("hyper_parameters")
    if not isinstance(hp, dict):
        raise CheckpointError(f"checkpoint {path}: no hyper_parameters")
    module = TBPTTModule(**hp)
    module.load_state_dict(ckpt["state_dict"])
    return module.eval()


def load_module(path: str) -> TBPTTModule:
    return module_from_checkpoint(load_checkpoint_file(path), path)


def load_registered(uri: str) -> torch.nn.Module:
    """The RecurrentModel of a model in the MLflow registry (``models:/NAME/VERSION``)."""
    import mlflow

    try:
        return mlflow.pytorch.load_model(uri, map_location="cpu").model.eval()
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"model {uri}: cannot be loaded: {first}") from None


@torch.no_grad()
def generate(module: Any, prompt: bytes, length: int, temperature: float = 1.0, top_k: Optional[int] = None,
             seed: int = 0) -> bytes:
    model = getattr(module, "model", module)  # a TBPTTModule or a RecurrentModel from the registry
    if not prompt:
        prompt = b"\n"
    g = torch.Generator().manual_seed(seed)
    state = None
    logits = None
    for b in prompt:  # the prompt streams through one byte at a time, the way text would arrive
        logits, state = model.step(torch.tensor([b]), state)
    out = bytearray()
    for _ in range(length):
        z = logits[0].float() / max(temperature, 1e-6)
        if top_k:
            kth = torch.topk(z, min(top_k, z.numel())).values[-1]
            z = torch.where(z < kth, torch.full_like(z, float("-inf")), z)
        nxt = int(torch.multinomial(torch.softmax(z, -1), 1, generator=g))
        out.append(nxt)
        logits, state = model.step(torch.tensor([nxt]), state)
    return bytes(out)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="distrnn generate", description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a distrnn checkpoint of a byte-level model")
    src.add_argument("--model", help="a registered MLflow model, models:/NAME/VERSION")
    p.add_argument("--prompt", default="", help="text to condition on")
    p.add_argument("--length", type=int, default=200, help="bytes to generate")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.length < 0:
        p.error("--length must be >= 0")
    try:
        module = load_module(a.checkpoint) if a.checkpoint else load_registered(a.model)
    except CheckpointError as e:
        print(f"distrnn: error: {e}", file=sys.stderr)
        return 2
    task = module.task
    if task.kind != "language_model" or task.vocab_size != 256 or task.token_unit != "byte":
        what = (f"a language model over {task.vocab_size} token ids of a tokenizer" if task.kind == "language_model"
                else f"a {task.kind} model")
        print(f"distrnn: error: {a.checkpoint or a.model}: {what}, not a byte-level language model: generate reads"
              " and writes bytes", file=sys.stderr)
        return 2
    text = generate(module, a.prompt.encode(), a.length, a.temperature, a.top_k, a.seed)
    sys.stdout.write(a.prompt + text.decode("utf-8", errors="replace") + "\n")
    return 0
