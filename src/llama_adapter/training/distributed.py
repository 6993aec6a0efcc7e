"""Data-parallel training across processes started by torchrun (DDP-style, optionally FSDP2 for the base).

Every process reads the same data and the same seeded plan and takes micro-batches rank, rank + world, ... of
each step. The adapter starts identical everywhere (a broadcast from rank 0) and its gradients, the only
trainable tensors, are summed together with the step's loss and token statistics in one all-reduce per step
(gloo on CPU, nccl on CUDA). With `--fsdp` the frozen base's blocks are sharded across the processes. With one
process (no WORLD_SIZE) every function here is a no-op or the identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from llama_adapter.errors import TrainingError

if TYPE_CHECKING:
    from llama_adapter.model import Transformer


@dataclass(frozen=True)
class Topology:
    """This process's place in the job, from torchrun's RANK / WORLD_SIZE / LOCAL_RANK."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the only process that writes files and logs."""
        return self.rank == 0


def topology() -> Topology:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Topology(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def resolve_device(requested: str, topo: Topology) -> torch.device:
    """The device of `--device` (auto: cuda if available); with several processes, cuda:LOCAL_RANK."""
    dev = requested
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda" and topo.world > 1:
        dev = f"cuda:{topo.local_rank}"
    d = torch.device(dev)
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError("--device cuda requested but CUDA is not available")
        torch.cuda.set_device(d)
    return d


def init_process_group(topo: Topology, device: torch.device) -> None:
    if topo.world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def broadcast_module(module: nn.Module, topo: Topology) -> None:
    """Rank 0's values of every tensor of `module` on every rank (an identical start)."""
    if topo.world > 1:
        import torch.distributed as dist

        for t in module.state_dict().values():
            dist.broadcast(t, 0)


def reduce_gradients(params: list[nn.Parameter], loss_sum: Tensor, n_tok: int, topo: Topology) -> tuple[Tensor, Tensor]:
    """The one all-reduce of a step: every rank's gradients of `params`, summed into their `.grad` (missing
    gradients count as zeros), together with the stats [loss_sum, n_tok]. Returns (the flat summed gradient,
    the summed stats)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])  # type: ignore[union-attr]
    stats = torch.tensor([float(loss_sum), n_tok], dtype=flat.dtype, device=flat.device)
    if topo.world > 1:
        import torch.distributed as dist

        buf = torch.cat([flat, stats])
        dist.all_reduce(buf)
        flat, stats = buf[: flat.numel()], buf[flat.numel() :]
        o = 0
        for p in params:
            p.grad.copy_(flat[o : o + p.numel()].view_as(p))  # type: ignore[union-attr]
            o += p.numel()
    return flat, stats


def all_reduce_sum(t: Tensor, device: torch.device, topo: Topology) -> Tensor:
    """`t` summed over the ranks (a CPU tensor in, a CPU tensor out)."""
    if topo.world > 1:
        import torch.distributed as dist

        t = t.to(device)  # nccl reduces CUDA tensors only
        dist.all_reduce(t)
        t = t.cpu()
    return t


def barrier(topo: Topology) -> None:
    if topo.world > 1:
        import torch.distributed as dist

        dist.barrier()


def local_base_bytes(model: Transformer) -> int:
    """Bytes of frozen base weights this process holds (a shard of each block under FSDP)."""
    total = 0
    for n, p in model.named_parameters():
        if not n.startswith("adapters."):
            t = p.to_local() if hasattr(p, "to_local") else p
            total += t.numel() * t.element_size()
    return total


def shard_frozen_base(model: Transformer) -> None:
    """FSDP2: shard each frozen transformer block across the process group (one block unsharded at a time).

    The adapter stays replicated (its gradients are all-reduced like DDP's); each layer projects its prompts
    inside its own forward, where FSDP has gathered that layer's k/v weights.
    """
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard  # type: ignore[no-redef,unused-ignore]  # torch < 2.6
    for block in model.layers:
        fully_shard(block)
