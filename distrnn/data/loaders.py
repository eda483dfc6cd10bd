"""Resumable batch iterables: the one place where stream batching and read positions live.

A loader yields dict batches ``{"x", "y", "mask", "reset", "epoch", "index"}``:
``mask_BT`` marks the steps that carry a loss, ``reset_BT`` the steps before which a row's state
must be zeroed (a new sequence starts there). Optionally ``mask_total_T``, the number of loss steps
at each step over every rank's rows (without it the TBPTT module all-reduces the counts under
DDP). Loaders implement Lightning's ``state_dict`` / ``load_state_dict`` protocol, so the read
position is saved in every checkpoint and a resumed run continues at the next unseen batch. The TBPTT module pulls batches itself (``dataloader_iter``),
so the saved position is exactly the number of batches consumed.

A batch is a function of (epoch, index) alone, so when the run is on a GPU a loader makes the
next one in a background thread while the current one trains (``prefetch``), in pinned memory
(``pin_device``): the host's data work (a selective-copy batch of 64 x 4096 costs ~2.5 ms on a
2-core VM; a memory-mapped corpus may wait on the disk) no longer stands between two updates while
the GPU idles. On a CPU the thread would take cores and the GIL from the training itself (a
selective-copy run on the 2-core VM: 2-4% slower with it), so it is off there. A batch made ahead
and not consumed is dropped: it never counts in the position.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor

from distrnn.config import ConfigError

Batch = dict[str, Any]


def batch_generator(seed: int, *parts: int) -> torch.Generator:
    """A generator owned by one batch: the same (seed, epoch, index, ...) gives the same numbers,
    whatever ran before, so resumed runs draw what uninterrupted runs draw."""
    g = torch.Generator()
    h = seed & 0xFFFFFFFF
    for p in parts:
        h = (h * 1_000_003 + (p & 0xFFFFFFFF) + 0x9E3779B9) % (2**63 - 1)
    g.manual_seed(h)
    return g


class ResumableLoader:
    """Batches indexed by (epoch, index); iteration starts at the saved position after a resume.

    ``make_batch`` must depend on (epoch, index) and the loader's settings only (no global RNG):
    with ``prefetch`` it runs in a background thread one batch ahead. ``pin_device`` (a CUDA
    device) puts the batch's tensors in page-locked memory there, so the copy to that GPU neither
    waits for the GPU's queue nor copies again on the main thread. The data module sets both when
    the run is on CUDA."""

    def __init__(self) -> None:
        self._epoch_source: Optional[Callable[[], int]] = None
        self._own_epoch = -1
        self.epoch = 0
        self.position = 0
        self._resume: Optional[tuple[int, int]] = None
        self.prefetch = False
        self.pin_device: Optional[torch.device] = None

    def bind_epoch(self, source: Callable[[], int]) -> None:
        """Take the epoch number from the trainer, which restores it on resume."""
        self._epoch_source = source

    def __len__(self) -> int:
        return self.num_batches()

    def num_batches(self) -> int:
        raise NotImplementedError

    def make_batch(self, epoch: int, index: int) -> Batch:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Batch]:
        if self._epoch_source is not None:
            epoch = self._epoch_source()
        else:
            self._own_epoch += 1
            epoch = self._own_epoch
        self.epoch, self.position = epoch, 0
        return self._iterate(epoch)

    def _iterate(self, epoch: int) -> Iterator[Batch]:
        # The saved position is read at the first batch, not at iter(): Lightning may create the
        # iterator before it hands the loader its state.
        start = 0
        if self._resume is not None and self._resume[0] == epoch:
            start = self._resume[1]
        self._resume = None
        self.position = start
        n = self.num_batches()
        if not self.prefetch or n - start < 2:
            for index in range(start, n):
                batch = self._made(epoch, index)
                self.position = index + 1
                yield batch
            return
        # One thread per iteration, one batch ahead; an exception in make_batch reaches the
        # consumer at the batch it belongs to (Future.result re-raises it).
        pool = ThreadPoolExecutor(1, thread_name_prefix="distrnn-prefetch", initializer=self._thread_device)
        ahead: Optional[Future] = pool.submit(self._made, epoch, start)
        try:
            for index in range(start, n):
                batch = ahead.result()
                ahead = pool.submit(self._made, epoch, index + 1) if index + 1 < n else None
                self.position = index + 1
                yield batch
        finally:
            # the iterator closed or dropped before the end (max_steps, an error): a batch still
            # being made is waited for, not leaked into the next epoch's iteration
            pool.shutdown(wait=True, cancel_futures=True)

    def _thread_device(self) -> None:
        # pinned memory is allocated in the current device's context: a new thread's is GPU 0,
        # where rank 1 of a node would otherwise open a context of its own (as DataLoader's pin thread does)
        if self.pin_device is not None and self.pin_device.type == "cuda":
            torch.cuda.set_device(self.pin_device)

    def _made(self, epoch: int, index: int) -> Batch:
        batch = self.make_batch(epoch, index)
        if self.pin_device is not None:
            batch = {k: pinned(v) if isinstance(v, Tensor) else v for k, v in batch.items()}
        return batch

    def layout(self) -> dict[str, Any]:
        """What a saved read position means: the settings that decide which data batch ``i``
        holds, by the config key that sets them. A resume whose loader has another layout would
        read other data at the saved position (:func:`layout_change`)."""
        return {}

    def global_layout(self, layout: dict[str, Any], world_size: int) -> Optional[dict[str, Any]]:
        """What decides the data of the run's global batch ``i`` (all ranks' batch ``i``
        together), for a loader of ``layout`` on ``world_size`` ranks: equal for two runs whose
        ranks, in rank order, read the same data at every index (4 ranks x batch 8 and 2 x 16);
        None where the data depend on the split itself."""
        if "data.batch_size" not in layout:
            return None
        g = dict(layout)
        g["global batch"] = g.pop("data.batch_size") * world_size
        return g

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "next_index": self.position, "layout": self.layout(), "num_batches": self.num_batches()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["next_index"]))
        self._own_epoch = int(state["epoch"]) - 1


class StreamLoader(ResumableLoader):
    """A token corpus cut into contiguous streams, served chunk by chunk in order.

    The ``N - 1`` input positions of the corpus are split into ``batch_size * world_size``
    contiguous streams whose lengths differ by at most one; rank r reads streams
    ``[r * batch_size, (r + 1) * batch_size)``. Across all ranks every input token is read exactly
    once per epoch and every target exactly once. The first chunk of an epoch resets every row;
    ``doc_starts_D``, sorted corpus positions, are further reset points (where the files of a
    folder corpus start): positions rather than a mask as long as the corpus, which may be a
    memory-mapped file larger than memory.
    """

    def __init__(
        self,
        tokens_N: Tensor,
        batch_size: int,
        seq_len: int,
        doc_starts_D: Optional[Tensor] = None,
        rank: int = 0,
        world_size: int = 1,
        vocab_size: Optional[int] = None,
        source: str = "data",
    ) -> None:
        super().__init__()
        n_inputs = tokens_N.numel() - 1
        n_streams = batch_size * world_size
        if n_inputs < n_streams:
            raise ValueError(
                f"corpus of {tokens_N.numel()} tokens is too short for {n_streams} streams"
                f" (batch_size {batch_size} x world size {world_size})"
            )
        self.tokens_N = tokens_N
        self.vocab_size, self.source = vocab_size, source
        self.doc_starts_D = doc_starts_D if doc_starts_D is not None and doc_starts_D.numel() else None
        self.batch_size = batch_size
        self.seq_len = seq_len
        base, extra = divmod(n_inputs, n_streams)
        lengths_S = torch.full((n_streams,), base, dtype=torch.long)
        lengths_S[:extra] += 1
        offsets_S = torch.cumsum(lengths_S, 0) - lengths_S
        rows = slice(rank * batch_size, (rank + 1) * batch_size)
        self.lengths_S = lengths_S
        self.lengths_B = lengths_S[rows]
        self.offsets_B = offsets_S[rows]
        self.stream_len = int(lengths_S.max())

    def num_batches(self) -> int:
        return math.ceil(self.stream_len / self.seq_len)

    def layout(self) -> dict[str, Any]:
        return {"data.batch_size": self.batch_size, "data.seq_len": self.seq_len, "the data (tokens)": self.tokens_N.numel()}

    def make_batch(self, epoch: int, index: int) -> Batch:
        t_L = torch.arange(index * self.seq_len, min((index + 1) * self.seq_len, self.stream_len))
        valid_BL = t_L[None, :] < self.lengths_B[:, None]
        pos_BL = torch.minimum(self.offsets_B[:, None] + t_L[None, :], self.offsets_B[:, None] + self.lengths_B[:, None] - 1)
        reset_BL = torch.zeros_like(valid_BL)
        if self.doc_starts_D is not None:
            i_BL = torch.searchsorted(self.doc_starts_D, pos_BL).clamp_(max=self.doc_starts_D.numel() - 1)
            reset_BL = (self.doc_starts_D[i_BL] == pos_BL) & valid_BL
        if index == 0:
            reset_BL[:, 0] = True
        x_BL, y_BL = self.tokens_N[pos_BL].long(), self.tokens_N[pos_BL + 1].long()
        if self.vocab_size is not None:
            self._check_ids(x_BL, pos_BL)
            self._check_ids(y_BL, pos_BL + 1)
        return {
            "x": x_BL,
            "y": y_BL,
            "mask": valid_BL,
            # the ranks' streams differ in length by one step at most: in the last batch some
            # ranks' rows may have no loss step where others' do, which the engine must know
            "mask_total": (t_L[None, :] < self.lengths_S[:, None]).sum(dim=0),
            "reset": reset_BL,
            "epoch": epoch,
            "index": index,
        }

    def _check_ids(self, ids_BL: Tensor, pos_BL: Tensor) -> None:
        # a few comparisons per token: a file read with the wrong dtype, or tokenized with another
        # vocabulary, fails here naming the file instead of deep inside the embedding
        bad_BL = (ids_BL < 0) | (ids_BL >= self.vocab_size)
        if bool(bad_BL.any()):
            i = bad_BL.nonzero()[0]
            raise ConfigError(
                f"{self.source}: token id {int(ids_BL[i[0], i[1]])} at position {int(pos_BL[i[0], i[1]])} is not"
                f" below data.vocab_size {self.vocab_size}: is data.dtype the files' type, data.vocab_size their vocabulary's?"
            )

    def stream_positions(self, index: int) -> Tensor:
        """Corpus positions of the inputs of batch ``index`` (-1 where a row has ended); for tests."""
        t_L = torch.arange(index * self.seq_len, min((index + 1) * self.seq_len, self.stream_len))
        pos = self.offsets_B[:, None] + t_L[None, :]
        return torch.where(t_L[None, :] < self.lengths_B[:, None], pos, torch.full_like(pos, -1))


class TensorLoader(ResumableLoader):
    """Batches of whole sequences from tensors with a leading sample dimension.

    The order is a permutation drawn from (seed, epoch) when ``shuffle``; each rank takes every
    ``world_size``-th batch, and as many as every other rank (a DDP update is a collective: the
    global batches that do not make a full round are left out) unless ``uneven``: then every
    batch is served and the first ranks may serve one more (evaluation and prediction, where no
    collective runs per batch). Every batch starts new sequences, so ``reset[:, 0]`` is True.
    ``fields`` holds ``x`` (sample count from its first dimension) and anything ``transform``
    turns into ``x``, ``y`` and optionally ``mask`` per batch (so large per-step targets need not be
    stored).

    ``pad_uneven`` (set by the data module when the strategy's forward is itself a collective:
    DeepSpeed ZeRO-3 gathers each module's parameters) makes an uneven loader give every rank as
    many batches as the first: a rank without a batch in the last round gets a copy of the last
    batch with no step to score (a weight of 0 in the metrics), marked ``padding`` (prediction
    writers leave it out).

    Under DDP a training batch carries ``mask_total`` (the loss steps of every rank's rows at each
    step, which spares the engine an all-reduce per batch: under NCCL a wait for the GPU) when the
    loader knows it without the other ranks' data: no mask (every step), a ``mask`` field (gathered
    from it), or ``mask_same_every_row`` (a data module whose transform gives every row the same
    mask: MNIST's last step).
    """

    def __init__(
        self,
        fields: dict[str, Tensor],
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        transform: Optional[Callable[[dict[str, Tensor]], dict[str, Tensor]]] = None,
        uneven: bool = False,
        mask_same_every_row: bool = False,
    ) -> None:
        super().__init__()
        self.uneven = uneven
        self.pad_uneven = False
        self.mask_same_every_row = mask_same_every_row
        self.fields = fields
        self.transform = transform
        self.n = fields["x"].shape[0]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size

    def _global_batches(self) -> int:
        if self.drop_last:
            return self.n // self.batch_size
        return math.ceil(self.n / self.batch_size)

    def layout(self) -> dict[str, Any]:
        return {"data.batch_size": self.batch_size, "the data (samples)": self.n, "data.seed": self.seed if self.shuffle else None}

    def num_batches(self) -> int:
        if self.uneven and self.pad_uneven:
            return math.ceil(self._global_batches() / self.world_size)
        if self.uneven:
            return len(range(self.rank, self._global_batches(), self.world_size))
        return self._global_batches() // self.world_size

    def make_batch(self, epoch: int, index: int) -> Batch:
        if self.shuffle:
            order = torch.randperm(self.n, generator=batch_generator(self.seed, epoch))
        else:
            order = torch.arange(self.n)
        g = index * self.world_size + self.rank
        padding = g >= self._global_batches()  # (pad_uneven)
        if padding:
            g = self._global_batches() - 1
        idx = order[g * self.batch_size : (g + 1) * self.batch_size]
        batch = {k: v[idx] for k, v in self.fields.items()}
        if self.transform is not None:
            batch = self.transform(batch)
        made_mask = "mask" not in batch
        batch = _complete(batch, epoch, index)
        if padding:
            batch["mask"] = torch.zeros_like(batch["mask"])
            batch["padding"] = True
        if self.world_size > 1 and not self.uneven:
            total = self._mask_total(order, index, batch["mask"], made_mask)
            if total is not None:
                batch["mask_total"] = total
        return batch

    def _mask_total(self, order: Tensor, index: int, mask_BT: Tensor, made_mask: bool) -> Optional[Tensor]:
        """The loss steps at each step over every rank's rows of global round ``index``, where
        the loader knows them (see the class docstring); None otherwise."""
        B = self.batch_size
        ranks = [index * self.world_size + r for r in range(self.world_size)]
        if made_mask or self.mask_same_every_row:
            rows = sum(max(0, min(B, self.n - g * B)) for g in ranks)
            return mask_BT[0].long() * rows
        if "mask" in self.fields and self.transform is None:
            return sum(self.fields["mask"][order[g * B : (g + 1) * B]].long().sum(dim=0) for g in ranks)
        return None


class GeneratedLoader(ResumableLoader):
    """Batches made on the fly by ``generate(generator, batch_size)`` from (seed, epoch, index, rank).

    Synthetic tasks at any length T need no memory for a data set, and a resumed run draws
    exactly the batches that an uninterrupted run draws.
    """

    def __init__(
        self,
        generate: Callable[[torch.Generator, int], dict[str, Tensor]],
        batch_size: int,
        batches_per_epoch: int,
        seed: int,
        rank: int = 0,
        fixed: bool = False,
    ) -> None:
        super().__init__()
        self.generate = generate
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self.rank = rank
        self.fixed = fixed  # validation: the same batches every epoch

    def num_batches(self) -> int:
        return self.batches_per_epoch

    def layout(self) -> dict[str, Any]:
        return {"data.batch_size": self.batch_size, "batches per epoch": self.batches_per_epoch, "data.seed": self.seed}

    def global_layout(self, layout: dict[str, Any], world_size: int) -> Optional[dict[str, Any]]:
        return None  # each rank draws its own batch from (seed, epoch, index, rank)

    def make_batch(self, epoch: int, index: int) -> Batch:
        g = batch_generator(self.seed, 0 if self.fixed else epoch, index, self.rank)
        return _complete(self.generate(g, self.batch_size), epoch, index)


def to_device_queued(t: Tensor, device: Any) -> Tensor:
    """``t`` on ``device``; from the host to a GPU through pinned memory, non-blocking, so the copy
    is queued behind the GPU's work instead of waiting for all of it (as a copy from pageable
    memory does: ``t.to("cuda")``, ``torch.tensor(..., device="cuda")``)."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return pinned(t).to(device, non_blocking=True)
    return t.to(device, non_blocking=True)


def pinned(t: Tensor) -> Tensor:
    """``t`` in page-locked host memory (a copy unless it is there or not on the host): from
    pageable memory the driver may wait for the GPU's queue before copying (CUDA's "API
    synchronization behavior")."""
    if t.device.type != "cpu" or t.is_pinned():
        return t
    # (not t.pin_memory(): for a view that pins the whole span of its storage)
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)


def layout_change(checkpoint: dict[str, Any], loader: Any) -> Optional[str]:
    """Why ``loader`` cannot continue at the read position that ``checkpoint`` saved (its first
    training loader's), as one line naming the config key; None when it can (or when the
    checkpoint or loader record no layout)."""
    loops = checkpoint.get("loops") or {}
    saved = ((loops.get("fit_loop") or {}).get("state_dict") or {}).get("combined_loader") or [None]
    before = saved[0].get("layout") if isinstance(saved[0], dict) else None
    if not before or not isinstance(loader, ResumableLoader):
        return None
    now = loader.layout()
    for key in before:
        if before[key] != now.get(key):
            return (f"{key}: {before[key]} in the checkpoint's run, {now.get(key)} in this one: the saved read position"
                    " would point at other data; resume with the same data settings, or pass --reshard true (the same"
                    " fraction of the epoch), or start a new run from the checkpoint's weights (--model.init_weights)")
    return None


def _complete(batch: dict[str, Tensor], epoch: int, index: int) -> Batch:
    x = batch["x"]
    B, T = x.shape[0], x.shape[1]
    if "mask" not in batch:
        batch["mask"] = torch.ones(B, T, dtype=torch.bool)
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[:, 0] = True
    batch["reset"] = reset
    batch["epoch"] = epoch
    batch["index"] = index
    return batch
