"""Synthetic long-range tasks, generated from a seed at any length T.

- adding: two numbers marked among T uniform values; answer their sum at the last step (MSE).
  Always answering 1 scores 1/6 = 0.167 (Hochreiter & Schmidhuber 1997; Le et al. 2015).
- copy_memory: 10 symbols from 8, a delay, a delimiter; repeat the symbols in the last 10 steps
  (Arjovsky et al. 2016). Guessing scores log 8 = 2.08 nats at those steps.
- selective_copy: ``num_tokens`` data tokens scattered among noise; after T - num_tokens steps,
  reproduce them in order (Gu & Dao 2023, the Mamba paper).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from distrnn.config import ConfigError, TaskSpec
from distrnn.data.base import DataSource, RecurrentDataModule
from distrnn.data.loaders import GeneratedLoader

COPY_LEN = 10
COPY_ALPHABET = 8


def adding_problem(g: torch.Generator, B: int, T: int) -> dict[str, Tensor]:
    values_BT = torch.rand(B, T, generator=g)
    half = T // 2
    first_B = torch.randint(0, half, (B,), generator=g)
    second_B = torch.randint(half, T, (B,), generator=g)
    markers_BT = torch.zeros(B, T)
    rows = torch.arange(B)
    markers_BT[rows, first_B] = 1.0
    markers_BT[rows, second_B] = 1.0
    target_B = values_BT[rows, first_B] + values_BT[rows, second_B]
    y_BT1 = torch.zeros(B, T, 1)
    y_BT1[:, -1, 0] = target_B
    mask_BT = torch.zeros(B, T, dtype=torch.bool)
    mask_BT[:, -1] = True
    return {"x": torch.stack([values_BT, markers_BT], dim=-1), "y": y_BT1, "mask": mask_BT}


def copy_memory(g: torch.Generator, B: int, T: int) -> dict[str, Tensor]:
    # tokens: 0 blank, 1..8 symbols, 9 delimiter; length T = 10 + delay + 10
    delay = T - 2 * COPY_LEN
    symbols_BK = torch.randint(1, COPY_ALPHABET + 1, (B, COPY_LEN), generator=g)
    x_BT = torch.zeros(B, T, dtype=torch.long)
    x_BT[:, :COPY_LEN] = symbols_BK
    x_BT[:, COPY_LEN + delay - 1] = COPY_ALPHABET + 1
    y_BT = torch.zeros(B, T, dtype=torch.long)
    y_BT[:, -COPY_LEN:] = symbols_BK
    mask_BT = torch.zeros(B, T, dtype=torch.bool)
    mask_BT[:, -COPY_LEN:] = True
    return {"x": x_BT, "y": y_BT, "mask": mask_BT}


def selective_copy(g: torch.Generator, B: int, T: int, num_tokens: int, alphabet: int) -> dict[str, Tensor]:
    # tokens: 0 noise, 1..alphabet data, alphabet + 1 marker (the "answer now" prompt)
    body = T - num_tokens
    keys_BT = torch.rand(B, body, generator=g)
    positions_BK = keys_BT.topk(num_tokens, dim=1).indices.sort(dim=1).values
    data_BK = torch.randint(1, alphabet + 1, (B, num_tokens), generator=g)
    x_BT = torch.zeros(B, T, dtype=torch.long)
    x_BT.scatter_(1, positions_BK, data_BK)
    x_BT[:, body:] = alphabet + 1
    y_BT = torch.zeros(B, T, dtype=torch.long)
    y_BT[:, body:] = data_BK
    mask_BT = torch.zeros(B, T, dtype=torch.bool)
    mask_BT[:, body:] = True
    return {"x": x_BT, "y": y_BT, "mask": mask_BT}


class SyntheticDataModule(RecurrentDataModule):
    """A synthetic long-range task; every batch is fresh data drawn from (seed, epoch, index).

    Args:
        name: adding, copy_memory or selective_copy.
        seq_len: sequence length T.
        batch_size: sequences per batch and rank.
        train_batches: batches per training epoch.
        val_batches: validation batches (the same ones every epoch).
        num_tokens: selective_copy: data tokens to remember.
        alphabet: selective_copy: distinct data tokens.
        seed: data seed.
    """

    def __init__(
        self,
        name: Literal["adding", "copy_memory", "selective_copy"] = "adding",
        seq_len: int = 100,
        batch_size: int = 32,
        train_batches: int = 100,
        val_batches: int = 8,
        num_tokens: int = 16,
        alphabet: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, seed)
        self.name = name
        self.seq_len = seq_len
        self.train_batches = train_batches
        self.val_batches = val_batches
        self.num_tokens = num_tokens
        self.alphabet = alphabet
        if train_batches <= 0 or val_batches <= 0:
            raise ConfigError("data.train_batches / data.val_batches: must be > 0")
        if name == "adding":
            if seq_len < 2:
                raise ConfigError(f"data.seq_len: the adding problem needs T >= 2, got {seq_len}")
            self.task = TaskSpec(kind="regression", output_dim=1, input_dim=2, seq_len=seq_len)
        elif name == "copy_memory":
            if seq_len <= 2 * COPY_LEN:
                raise ConfigError(f"data.seq_len: copy_memory needs T > {2 * COPY_LEN}, got {seq_len}")
            self.task = TaskSpec(kind="classification", output_dim=COPY_ALPHABET + 2, vocab_size=COPY_ALPHABET + 2, seq_len=seq_len)
        elif name == "selective_copy":
            if num_tokens <= 0 or alphabet <= 0:
                raise ConfigError("data.num_tokens / data.alphabet: must be > 0")
            if seq_len < 2 * num_tokens:
                raise ConfigError(f"data.seq_len: selective_copy needs T >= 2 * num_tokens = {2 * num_tokens}, got {seq_len}")
            self.task = TaskSpec(kind="classification", output_dim=alphabet + 2, vocab_size=alphabet + 2, seq_len=seq_len)
        else:
            raise ConfigError(f"data.name: unknown task {name!r}; known: adding, copy_memory, selective_copy")

    def generate(self, g: torch.Generator, B: int) -> dict[str, Tensor]:
        if self.name == "adding":
            batch = adding_problem(g, B, self.seq_len)
        elif self.name == "copy_memory":
            batch = copy_memory(g, B, self.seq_len)
        else:
            batch = selective_copy(g, B, self.seq_len, self.num_tokens, self.alphabet)
        # where the loss is depends on the step alone, and every rank draws full batches: the
        # count over all ranks' rows, which the TBPTT module would otherwise all-reduce under DDP
        batch["mask_total"] = batch["mask"].sum(dim=0) * self.world_size
        return batch

    def datasets(self) -> dict[str, DataSource]:
        args = {"name": self.name, "seq_len": self.seq_len, "seed": self.seed}
        if self.name == "selective_copy":
            args.update(num_tokens=self.num_tokens, alphabet=self.alphabet)
        uri = f"{type(self).__module__}.{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in args.items())})"
        # drawn from (seed, epoch, index): the arguments are the content (the code's version is the run's tags)
        return {split: DataSource(self.name, uri, [uri, split], {"batches_per_epoch": n, "batch_size": self.batch_size},
                                  source_type="code")
                for split, n in (("train", self.train_batches), ("val", self.val_batches))}

    def train_dataloader(self) -> GeneratedLoader:
        return self._bind(GeneratedLoader(self.generate, self.batch_size, self.train_batches, self.seed, self.rank))

    def val_dataloader(self) -> GeneratedLoader:
        # a different seed stream from training, fixed across epochs
        return self._bind(GeneratedLoader(self.generate, self.batch_size, self.val_batches, self.seed + 1_000_003, self.rank, fixed=True))

    def test_dataloader(self) -> GeneratedLoader:
        return self._bind(GeneratedLoader(self.generate, self.batch_size, self.val_batches, self.seed + 2_000_003, self.rank, fixed=True))
