"""torch.distributed for Zebra: process group, FSDP2 sharding, checkpoints, HF export.

Anchors: nanochat's `compute_init` / `compute_cleanup` / `print0`, torchtitan's FSDP recipe
(`apply_fsdp_to_decoder`) and its DCP checkpointer (`step-N` folders, highest complete step wins).

Process group. Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the environment) every process
joins the group of WORLD_SIZE ranks: nccl on CUDA/ROCm (one GPU per LOCAL_RANK), gloo on CPU.
Without torchrun a one-rank group is made in process (a HashStore, no port), so a single process
runs the same FSDP2 code path as many.

FSDP2. With N ranks every parameter W (rows r) is stored as the dim-0 shard W[k r/N : (k+1) r/N]
on rank k, a DTensor. `fully_shard` groups are, as in torchtitan: each decoder layer; the
embeddings; norm + lm_head (with the embeddings when tied, since one tensor can be in one group
only); then the root, here the body `model.model` (`_fully_shard_decoder` says why). Before a
group runs its shards are all-gathered; after backward its gradients are reduce-scattered
(averaged over ranks), so the optimizer updates shards only.
Mixed precision on GPU: fp32 master weights and optimizer state, bf16 all-gathered weights for
compute, fp32 gradient reduction. CPU stays fp32 (bf16 matmuls are slow there, and the CPU
tests compare runs in fp32).

Checkpoints (torch.distributed.checkpoint, DCP). `out/step-00000120/` holds:
    __0_0.distcp ... .metadata   model + optimizer, each rank writing its own shards; DCP
                                 reshards on load, so N ranks' checkpoint loads on M ranks
    rng-rank{r}.pt               torch CPU (+ CUDA), python and numpy RNG states of rank r
    train_state.json             step, tokens, data position and whatever the trainer adds
    COMPLETE                     written last
A step is written under `.step-N.tmp` and renamed once complete, so a crash leaves no folder
that looks finished; on resume the highest `step-N` holding COMPLETE wins, and only the
`keep_last` newest complete steps are kept. All ranks must see the same `out` (a shared disk).
"""

import dataclasses
import json
import os
import pickle
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

STEP_DIR = re.compile(r"step-(\d+)")
COMPLETE = "COMPLETE"


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join (or, without torchrun, make) the process group; pick this rank's device."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():  # also true on ROCm, where "nccl" means RCCL
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        if "RANK" in os.environ:  # torchrun: rendezvous through MASTER_ADDR / MASTER_PORT
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistInfo(rank, local_rank, world_size, device)


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def print0(*args):
    if get_rank() == 0:
        print(*args, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------------
# FSDP2


def _fully_shard_decoder(model: nn.Module, mp_policy: MixedPrecisionPolicy) -> nn.Module:
    """fully_shard each layer, the embeddings, norm + lm_head, then the body `model.model` as root.

    The root is the body, not the whole model, because stages call the body on its own
    (`model.model(ids, hidden_states=...)`) and then read `lm_head.weight` directly (chunked KD):
    FSDP2 needs every forward to enter through its root. The head group is not resharded after
    forward (torchtitan: backward would gather it straight back), which also leaves lm_head.weight
    gathered when the body returns. Calling layers one by one (ILD) works too: each becomes a root
    of its own; but then the same model must not also be run through the body."""
    mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (dist.get_world_size(),))
    shard = dict(mesh=mesh, mp_policy=mp_policy)
    for layer in model.model.layers:
        fully_shard(layer, **shard)
    head = [model.model.norm, model.lm_head]
    if model.lm_head.weight is model.model.embed_tokens.weight:  # a tensor can be in one group only
        head.insert(0, model.model.embed_tokens)
    else:
        fully_shard(model.model.embed_tokens, **shard)
    fully_shard(head, reshard_after_forward=False, **shard)
    # The root must not cast its inputs: casting rebuilds containers, so the `hidden_states` list a
    # caller passes in would be copied and stay empty (ILD with bf16). Each layer casts its own input.
    fully_shard(model.model, mesh=mesh, mp_policy=dataclasses.replace(mp_policy, cast_forward_inputs=False))
    return model


def _mp_policy(mixed_precision: bool) -> MixedPrecisionPolicy:
    if mixed_precision and torch.cuda.is_available():
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(model: nn.Module, mixed_precision: bool) -> nn.Module:
    """FSDP2-shard a causal LM (`.model.embed_tokens/.layers/.norm`, `.lm_head`) in place.

    Needs the process group (`init_distributed`); the shards move to this rank's device."""
    return _fully_shard_decoder(model, _mp_policy(mixed_precision))


def shard_teacher(model: nn.Module, mixed_precision: bool) -> nn.Module:
    """Shard a frozen model (teacher, DPO reference) the same way, with no grads, in eval mode."""
    model.requires_grad_(False).eval()
    return _fully_shard_decoder(model, _mp_policy(mixed_precision))


def set_gradient_sync(model: nn.Module, sync: bool):
    """Reduce gradients over ranks (FSDP2) only when `sync`; a plain module always has them."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_requires_gradient_sync(sync, recurse=False)


# ---------------------------------------------------------------------------------------
# Checkpoints


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def step_dirs(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `out` as (step, path), oldest first; unfinished ones do not count."""
    found = []
    for path in Path(out).glob("step-*"):
        match = STEP_DIR.fullmatch(path.name)
        if match and (path / COMPLETE).is_file():
            found.append((int(match[1]), path))
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    done = step_dirs(out)
    return done[-1][1] if done else None


def save_checkpoint(out: Path, step: int, model: nn.Module, optimizer, train_state: dict, keep_last: int) -> Path:
    """Write step `step` atomically (collective: every rank calls it) and prune old steps."""
    out, rank = Path(out), get_rank()
    final, tmp = out / f"step-{step:08d}", out / f".step-{step:08d}.tmp"
    if rank == 0:  # unfinished steps left by a crash
        for stale in out.glob(".step-*.tmp"):
            shutil.rmtree(stale)
    barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp, no_dist=not dist.is_initialized())
    # our own file, so pickle: RNG states hold tuples and numpy arrays
    with open(tmp / f"rng-rank{rank}.pt", "wb") as f:
        pickle.dump(rng_state(), f)
    barrier()
    if rank == 0:
        (tmp / "train_state.json").write_text(json.dumps(train_state, indent=1))
        (tmp / COMPLETE).touch()
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for _, old in step_dirs(out)[:-keep_last]:
            shutil.rmtree(old)
    barrier()
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer) -> dict:
    """Load model + optimizer (resharded to this world size), this rank's RNG; return train_state."""
    path = Path(path)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker)")
    model_state, optim_state = get_state_dict(model, optimizer)
    # AdamW makes a parameter's state at its first gradient, so parameters that had none yet (the
    # embeddings and head in ILD) have none on disk: they start without one, as they would have
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    optim_state["state"] = {fqn: s for fqn, s in optim_state["state"].items() if f"optim.state.{fqn}.step" in saved}
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    # strict=False lets those parameters be stateless; dcp.load has already demanded every model key
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False))
    rng_file = path / f"rng-rank{get_rank()}.pt"
    if rng_file.is_file():  # absent when resuming on more ranks than saved: those keep their seed
        with open(rng_file, "rb") as f:
            set_rng_state(pickle.load(f))
    return json.loads((path / "train_state.json").read_text())


def export_hf(model: nn.Module, path: Path, write: Callable[[Path, dict], None]):
    """Gather the full fp32 state dict on rank 0 and `write(dir, state_dict)` it, atomically.

    `write` is the model's HF writer (e.g. a partial of zebra.hub.write_model_dir with the config
    bound); it writes into a temporary directory that is renamed to `path` once it returns."""
    path = Path(path)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)  # collective; empty on ranks > 0
    if get_rank() == 0:
        tmp = path.with_name(f".{path.name}.tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        write(tmp, state)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    barrier()
