"""Checkpoint files, without Lightning: written atomically with a checksum, read with
``weights_only=True``, and DeepSpeed's sharded directories converted into one file.

A checkpoint is one file holding everything resume needs (weights, optimizer, scheduler, loop
and data position from Lightning; carried hidden state and RNG from the TBPTT module). It is
written to a temporary file beside the target, flushed to disk, then renamed over it, so a
process killed mid-save leaves the previous checkpoint intact. Loading never unpickles
arbitrary objects. ``distrnn convert-checkpoint`` and ``distrnn generate`` start from here
without importing Lightning; its checkpoint IO and callbacks are in :mod:`distrnn.checkpoint`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor

class CheckpointError(RuntimeError):
    """A checkpoint file is missing, torn or not one of ours; the message names the file."""


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def verify_checksum(p: Path) -> None:
    """torch.load does not notice flipped bytes inside tensor data: it loads wrong weights. Files
    written by :func:`save_checkpoint_file` carry a SHA-256 sidecar, checked here. A link
    (``save_last: link``) is checked against its target's sidecar."""
    if p.is_symlink():
        p = p.resolve()
    side = _sidecar(p)
    if not side.is_file():
        return
    if _sha256(p) not in side.read_text().split():
        raise CheckpointError(f"checkpoint {p}: contents do not match its checksum ({side.name}): the file is corrupted")


def load_checkpoint_file(path: str | os.PathLike, map_location: Any = "cpu", training: bool = True,
                         mmap: bool = False) -> dict[str, Any]:
    """Load safely; with ``training``, also insist on a Lightning training checkpoint. ``mmap``:
    the tensors are mapped from the file, not read (checks of a checkpoint that Lightning then
    loads itself: its metadata without a second read of the weights and optimizer state)."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p}: no such file")
    verify_checksum(p)
    if p.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {p}: empty file")
    if not _looks_like_torch_save(p):
        raise CheckpointError(f"checkpoint {p}: not a PyTorch checkpoint file (neither torch.save's zip format nor a pickle)")
    try:
        try:
            ckpt = torch.load(p, map_location=map_location, weights_only=True, mmap=mmap)
        except RuntimeError as e:
            if not (mmap and "mmap" in str(e)):
                raise
            ckpt = torch.load(p, map_location=map_location, weights_only=True)  # torch's legacy format
    except Exception as e:
        raise CheckpointError(f"checkpoint {p}: cannot be loaded safely: {_load_error(e)}") from None
    if training and (not isinstance(ckpt, dict) or "state_dict" not in ckpt):
        raise CheckpointError(f"checkpoint {p}: not a distrnn/Lightning checkpoint (no state_dict)")
    return ckpt


def save_checkpoint_file(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``checkpoint`` to ``path`` atomically (temporary file, fsync, rename) with its
    SHA-256 sidecar; if anything fails, the previous file at ``path`` is left as it was."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        # The sidecar lists the new hash and the current file's, and is replaced before the
        # file: a crash between the two renames leaves a file that still matches it.
        side = _sidecar(target)
        previous = side.read_text().split()[-1:] if side.is_file() else []
        side_tmp = side.with_name(f".{side.name}.{os.getpid()}.tmp")
        side_tmp.write_text("\n".join([*previous, _sha256(tmp)]) + "\n")
        os.replace(side_tmp, side)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_sidecar(path: str | os.PathLike) -> None:
    """Remove the checksum sidecar of the checkpoint file at ``path`` (when the file is removed)."""
    _sidecar(Path(path)).unlink(missing_ok=True)


def _looks_like_torch_save(p: Path) -> bool:
    """torch.save writes a zip archive (or, in its legacy format, a pickle: protocol >= 2 opens
    with 0x80). Only the opening bytes: a torn file still starts like one, and torch.load's error
    says what is wrong with it."""
    with open(p, "rb") as f:
        head = f.read(4)
    return head.startswith(b"\x80") or head == b"PK\x03\x04"


def _load_error(e: Exception) -> str:
    """What torch.load refused, in a line (its weights_only message is a paragraph on PyTorch
    2.6's default and how to override it, the same for every refusal, around the one fact)."""
    text = str(e)
    if "Weights only load failed" not in text:
        return text.strip().splitlines()[0] if text.strip() else type(e).__name__
    said = ""
    if "WeightsUnpickler error:" in text:
        said = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0].split(" Please use")[0].strip()
    elif "Trying to load unsupported" in text:
        said = "Trying to load unsupported" + text.split("Trying to load unsupported", 1)[1].splitlines()[0]
    return "torch.load(weights_only=True) refuses it" + (f": {said}" if said else " (it names objects to construct)")


# What DeepSpeed adds to the client state Lightning gives it; not part of a distrnn checkpoint.
_DEEPSPEED_KEYS = {
    "module", "optimizer", "lr_scheduler", "csr_tensor_module_names", "sparse_tensor_module_names",
    "skipped_steps", "global_steps", "global_samples", "dp_world_size", "mp_world_size", "ds_config",
    "ds_version", "buffer_names", "param_shapes", "frozen_param_shapes", "shared_params",
    "frozen_param_fragments", "data_sampler", "random_ltd", "zero_stage", "optimizer_state_dict",
}

TRUST_FLAG = "--trust_deepspeed_checkpoint true"


def is_deepspeed_checkpoint(path: str | os.PathLike) -> bool:
    """A directory as Lightning's DeepSpeed strategy saves one (``latest`` names the tag folder)."""
    return Path(path).is_dir() and (Path(path) / "latest").is_file()


def check_deepspeed_checkpoint(path: str | os.PathLike, trusted: bool) -> dict[str, Any]:
    """Refuse an untrusted DeepSpeed checkpoint directory, else check that every rank's shard is
    there; returns the client state (Lightning's loop state, distrnn's carried state, run id).

    DeepSpeed reads its files with ``torch.load(weights_only=False)``, which runs whatever code a
    pickle in them names, so only directories the user vouches for are opened at all."""
    p = Path(path)
    if not trusted:
        raise CheckpointError(
            f"checkpoint {p}: a DeepSpeed checkpoint directory, which DeepSpeed loads with pickle (code in it would"
            f" run); pass {TRUST_FLAG} only for a directory your own jobs wrote"
        )
    tag = (p / "latest").read_text().strip()
    d = p / tag
    models = sorted(d.glob("*model_states.pt"))
    if not models:
        raise CheckpointError(f"checkpoint {d}: no model states file (mp_rank_00_model_states.pt): not a complete DeepSpeed checkpoint")
    try:
        client = torch.load(models[0], map_location="cpu", weights_only=False)  # trusted above
    except Exception as e:
        raise CheckpointError(f"checkpoint {models[0]}: cannot be loaded: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None
    world = int(client.get("dp_world_size", 1))
    optim = _optimizer_shard_name(d)
    stage = int(((client.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0))
    expected = []
    if stage > 0 or optim.startswith("bf16_"):
        expected.append(optim)
    if stage == 3:
        expected.append("zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
    for rank in range(world):
        for pattern in expected:
            shard = d / pattern.format(rank=rank)
            if not shard.is_file():
                raise CheckpointError(f"checkpoint {shard}: missing: the shard of rank {rank} of {world}; the checkpoint is incomplete")
    return client


def convert_deepspeed_checkpoint(path: str | os.PathLike, output: str | os.PathLike, trusted: bool) -> Path:
    """One fp32 file from a (sharded) DeepSpeed checkpoint directory: the full weights in
    ``state_dict`` and Lightning's and distrnn's state beside them, written atomically with a
    checksum and loadable with ``weights_only=True`` (``distrnn generate --checkpoint``, or weights
    for a run without DeepSpeed). From ZeRO-1, 2 and 3, fp32 or bf16 (DeepSpeed's bf16 optimizer
    too), the optimizer state comes along, joined from the ranks' shards, so a run without
    DeepSpeed, on any number of devices, resumes from the file (``--ckpt_path FILE --reshard true``)."""
    client = check_deepspeed_checkpoint(path, trusted)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    d = Path(path) / (Path(path) / "latest").read_text().strip()
    state_dict, refused = None, ""
    try:  # (first, alone: the shards it reads are freed before the optimizer's are read below)
        state_dict = get_fp32_state_dict_from_zero_checkpoint(str(path))
    except (ValueError, KeyError, RuntimeError) as e:
        refused = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    parts = _optimizer_shards(d, client)
    if state_dict is None:
        # zero_to_fp32 reads ZeRO's shards only; the bf16 optimizer's fp32 master weights are
        # joined here as its moments are
        if not (parts and _is_bf16_optimizer(parts[0])):
            raise CheckpointError(f"checkpoint {path}: DeepSpeed cannot join its weights: {refused}")
        state_dict = _bf16_optimizer_weights(d, client, parts)
    out = {k: v for k, v in client.items() if k not in _DEEPSPEED_KEYS}
    out["state_dict"] = {k.removeprefix("_forward_module."): v.float() if v.is_floating_point() else v
                         for k, v in state_dict.items()}
    optimizer = _zero_optimizer_state(d, client, parts) if parts else None
    if optimizer is not None:
        out["optimizer_states"] = [optimizer]
    import io

    buf = io.BytesIO()
    torch.save(out, buf)
    buf.seek(0)
    try:  # fail here, naming the key, rather than at the first safe load
        torch.load(buf, weights_only=True)
    except Exception as e:
        bad = []
        for k, v in out.items():
            b = io.BytesIO()
            torch.save(v, b)
            b.seek(0)
            try:
                torch.load(b, weights_only=True)
            except Exception:
                bad.append(k)
        raise CheckpointError(f"checkpoint {path}: keys {bad} hold objects a safe load refuses: {str(e).splitlines()[0]}") from None
    save_checkpoint_file(out, output)
    return Path(output)


def _optimizer_shard_name(d: Path) -> str:
    """The name pattern (``{rank}``) of a tag folder's optimizer shards: DeepSpeed prefixes
    ``bf16_`` in every run with bf16, whatever its optimizer."""
    return ("bf16_" if (d / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file() else "") + "zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def _optimizer_shards(d: Path, client: dict[str, Any]) -> Optional[list[dict[str, Any]]]:
    """Every rank's ``optimizer_state_dict``; None without such shards or parameter shapes."""
    world, name = int(client.get("dp_world_size", 1)), _optimizer_shard_name(d)
    shards = [d / name.format(rank=r) for r in range(world)]
    if not client.get("param_shapes") or not all(f.is_file() for f in shards):
        return None
    return [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in shards]  # trusted: see caller


def _is_bf16_optimizer(part: dict[str, Any]) -> bool:
    """DeepSpeed's bf16 optimizer (ZeRO-1 with bf16 weights and fp32 gradient accumulation) keeps
    no ``zero_stage``; its fp32 master weights are each rank's share of each group's flat vector."""
    return int(part.get("zero_stage", 0)) == 0 and "single_partition_of_fp32_groups" in part and "base_optimizer_state" in part


def _bf16_optimizer_weights(d: Path, client: dict[str, Any], parts: list[dict[str, Any]]) -> dict[str, Tensor]:
    """The module's state (buffers, frozen parameters) with every trained parameter replaced by
    its fp32 master copy, joined from the ranks' shares and cut per parameter in group order
    (parameters end to end, the padding at each group's end)."""
    state = dict(client.get("module") or {})
    for g, group_shapes in enumerate(client["param_shapes"]):
        flat = torch.cat([p["single_partition_of_fp32_groups"][g] for p in parts])
        for name, shape, offset, n in _param_slices(d, group_shapes, None, flat.numel()):
            state[name] = flat[offset:offset + n].reshape(shape).clone()
    for alias, name in (client.get("shared_params") or {}).items():
        if name in state:
            state[alias] = state[name]
    return state


def _zero_optimizer_state(d: Path, client: dict[str, Any], parts: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """A ZeRO checkpoint's optimizer state as torch's ``Optimizer.state_dict()`` over the whole
    parameters, numbered in the order the module gave them to the optimizer (DeepSpeed's
    ``param_shapes``): every flat per-element state (``exp_avg``, ``exp_avg_sq``, ...) is joined
    from the ranks' shards and cut per parameter where DeepSpeed's zero_to_fp32 cuts the fp32
    weights, and per-group scalars (``step``) go to each parameter. ZeRO-1/2 shard each group's
    flat vector by rank (alignment paddings between parameters); ZeRO-3 shards every parameter
    (ceil(numel / ranks) elements on each rank, in parameter order); DeepSpeed's bf16 optimizer
    as ZeRO-1 without the paddings between parameters. None where the layout is another, or
    ZeRO-3 with several parameter groups."""
    shapes = client["param_shapes"]
    stage = int(parts[0].get("zero_stage", 0))
    if stage in (1, 2) and "base_optimizer_state" in parts[0]:
        return _zero12_optimizer_state(d, [p["base_optimizer_state"] for p in parts], shapes, parts[0].get("param_alignment_paddings"))
    if stage == 3 and "optimizer_state_dict" in parts[0] and len(shapes) == 1:
        return _zero3_optimizer_state(d, [p["optimizer_state_dict"] for p in parts], shapes[0])
    if _is_bf16_optimizer(parts[0]):  # (padding at each group's end only)
        return _zero12_optimizer_state(d, [p["base_optimizer_state"] for p in parts], shapes, None)
    return None


def _param_slices(d: Path, group_shapes: dict[str, Any], paddings: Optional[list[int]],
                  numel: float) -> list[tuple[str, tuple[int, ...], int, int]]:
    """(name, shape, offset, numel) of each parameter in a group's flat vector joined from the
    ranks' shares: parameters end to end, each followed by its alignment padding (ZeRO-1/2)."""
    slices, offset = [], 0
    for j, (name, shape) in enumerate(group_shapes.items()):
        n = math.prod(shape)
        if offset + n > numel:
            raise CheckpointError(f"checkpoint {d}: optimizer shards hold fewer elements than parameter {name} needs")
        slices.append((name, tuple(shape), offset, n))
        offset += n + (int(paddings[j]) if paddings else 0)
    return slices


def _flat_and_scalars(state: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    flat = [k for k, v in state.items() if torch.is_tensor(v) and v.dim() == 1]
    return flat, {k: v for k, v in state.items() if k not in flat}


def _zero12_optimizer_state(d: Path, bases: list[dict[str, Any]], shapes: list[dict[str, Any]],
                            paddings: Optional[list[list[int]]]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    groups = []
    index = 0
    for g, group_shapes in enumerate(shapes):
        keys, scalars = _flat_and_scalars(bases[0]["state"].get(g, {}))
        flat = {k: torch.cat([b["state"][g][k] for b in bases]) for k in keys}
        ids = []
        numel = min((t.numel() for t in flat.values()), default=math.inf)
        for _, shape, offset, n in _param_slices(d, group_shapes, paddings[g] if paddings else None, numel):
            if keys or scalars:  # (no state before the first step)
                state[index] = {**{k: _copy(v) for k, v in scalars.items()},
                                **{k: t[offset:offset + n].reshape(shape).clone() for k, t in flat.items()}}
            ids.append(index)
            index += 1
        groups.append({**{k: v for k, v in bases[0]["param_groups"][g].items() if k != "params"}, "params": ids})
    return {"state": state, "param_groups": groups}


def _zero3_optimizer_state(d: Path, bases: list[dict[str, Any]], shapes: dict[str, Any]) -> dict[str, Any]:
    world = len(bases)
    subgroups = sorted(bases[0]["state"])
    keys, scalars = _flat_and_scalars(bases[0]["state"][subgroups[0]] if subgroups else {})
    # each rank's shards of all sub-groups, end to end, as zero_to_fp32 reads its fp32 weights
    flat = {k: [torch.cat([b["state"][sg][k] for sg in subgroups]) for b in bases] for k in keys}
    state: dict[int, dict[str, Any]] = {}
    offset = 0
    for index, (name, shape) in enumerate(shapes.items()):
        n = math.prod(shape)
        part = math.ceil(n / world)
        if any(offset + part > t[0].numel() for t in flat.values()):
            raise CheckpointError(f"checkpoint {d}: optimizer shards hold fewer elements than parameter {name} needs")
        if keys or scalars:
            state[index] = {**{k: _copy(v) for k, v in scalars.items()},
                            **{k: torch.cat([r[offset:offset + part] for r in ranks])[:n].reshape(tuple(shape)).clone()
                               for k, ranks in flat.items()}}
        offset += part
    group = {k: v for k, v in bases[0]["param_groups"][0].items() if k != "params"}
    return {"state": state, "param_groups": [{**group, "params": list(range(len(shapes)))}]}


def _copy(v: Any) -> Any:
    return v.clone() if torch.is_tensor(v) else v


def convert_main(argv: Optional[list[str]] = None) -> int:
    """``distrnn convert-checkpoint DIR OUT [--trust_deepspeed_checkpoint true]``."""
    import argparse
    import sys

    p = argparse.ArgumentParser(prog="distrnn convert-checkpoint", description=convert_deepspeed_checkpoint.__doc__)
    p.add_argument("checkpoint_dir", help="a DeepSpeed checkpoint directory (what Lightning's DeepSpeed strategy saves)")
    p.add_argument("output", help="the single fp32 checkpoint file to write")
    p.add_argument("--trust_deepspeed_checkpoint", type=lambda v: v.lower() in ("1", "true", "yes"), default=False,
                   help="the directory was written by your own jobs (DeepSpeed unpickles it)")
    a = p.parse_args(argv)
    if not is_deepspeed_checkpoint(a.checkpoint_dir):
        print(f"distrnn: error: checkpoint {a.checkpoint_dir}: not a DeepSpeed checkpoint directory (no 'latest' file)", file=sys.stderr)
        return 2
    from distrnn.paths import unwritable_file

    why = unwritable_file(a.output, "the converted checkpoint", "model.ckpt")
    if why:  # found when the file was written, after reading and joining every rank's shards
        print(f"distrnn: error: output: {why}", file=sys.stderr)
        return 2
    try:
        out = convert_deepspeed_checkpoint(a.checkpoint_dir, a.output, a.trust_deepspeed_checkpoint)
    except CheckpointError as e:
        print(f"distrnn: error: {e}", file=sys.stderr)
        return 2
    with_optimizer = "optimizer_states" in torch.load(out, map_location="cpu", weights_only=True, mmap=True)
    print(f"wrote {out} (fp32 weights of {a.checkpoint_dir}"
          + (" and its optimizer state: a run without DeepSpeed resumes from it)" if with_optimizer else
             "; its optimizer state is not converted (a layout distrnn does not know): start a run from it with"
             " --model.init_weights)"))
    return 0
