"""Data-parallel selector training: one process per device, each taking its share of every batch.

Only the scorer trains, so per step the processes exchange nothing but its gradient (12.85M
numbers for Qwen2.5-VL-7B) and a few counts. Each process normalises its loss by the counts of
the *whole* batch (answer tokens for the language loss, visual tokens for the selection loss),
so the summed gradients are exactly the gradient a single process computes on the whole batch:
a run's result does not depend on how many processes share it, and a run saved by N processes
resumes on M.

The process group is the one ``torchrun`` or ``accelerate launch`` describe in the environment
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``); NCCL on GPUs, gloo
on CPUs.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

__all__ = ["ProcessGroup", "current_group", "join_launched_group", "launched_world_size", "local_device",
           "share", "sum_across", "sum_gradients", "broadcast_parameters", "barrier", "main_process_first",
           "check_same_weights", "shard_language_model"]


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in the run: ``rank`` of ``size`` processes (0 of 1 when alone)."""

    rank: int = 0
    size: int = 1

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def current_group() -> ProcessGroup:
    """The initialised default process group, or a group of one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return ProcessGroup(dist.get_rank(), dist.get_world_size())
    return ProcessGroup()


def launched_world_size() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(text)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be a whole number of processes, got {text!r}") from None
    if size < 1:
        raise ValueError(f"WORLD_SIZE must be at least 1, got {size}")
    return size


def local_device(requested: str) -> torch.device:
    """The device of this process: ``requested`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``); under a
    launcher, ``auto`` and ``cuda`` mean this process's own GPU, ``cuda:LOCAL_RANK``."""
    from ..commands.common import parse_device

    device = parse_device(requested)
    if device.type == "cuda" and device.index is None and launched_world_size() > 1:
        index = int(os.environ.get("LOCAL_RANK", "0"))
        if index >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK is {index} but this machine has {torch.cuda.device_count()} CUDA "
                             "device(s); start at most one process per GPU (torchrun --nproc_per_node)")
        device = torch.device("cuda", index)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def join_launched_group(device: torch.device) -> tuple[ProcessGroup, bool]:
    """Join the process group the launcher describes, if it started several processes.

    Returns the group and whether this call created it (and so should destroy it at the end).
    """
    import torch.distributed as dist

    if launched_world_size() == 1 or dist.is_initialized():
        return current_group(), False
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {name} is not set; start several "
                             "processes with torchrun or accelerate launch, which set both")
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    return current_group(), True


def share(items: list, group: ProcessGroup) -> list:
    """This process's contiguous share of ``items``; shares differ in length by at most one, the
    first ones longer, and concatenated in rank order they are ``items``."""
    if not group.active:
        return list(items)
    base, extra = divmod(len(items), group.size)
    start = group.rank * base + min(group.rank, extra)
    return list(items[start:start + base + (group.rank < extra)])


def sum_across(values: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """``values`` summed over the processes (returned as is when alone)."""
    if not group.active:
        return values
    import torch.distributed as dist

    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def sum_gradients(parameters: list[torch.Tensor], group: ProcessGroup, extra: torch.Tensor) -> torch.Tensor:
    """Sum every parameter's gradient over the processes in place, in one message, together with
    ``extra`` (a few float64 numbers to add up too); returns ``extra`` summed.

    A parameter without a gradient (its process had no examples this step) counts as zeros.
    """
    if not group.active:
        return extra
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.detach().reshape(-1).to(torch.float64) for g in grads] + [extra.to(grads[0].device)])
    flat = sum_across(flat, group)
    offset = 0
    for parameter, grad in zip(parameters, grads):
        count = grad.numel()
        parameter.grad = flat[offset:offset + count].view_as(grad).to(grad.dtype)
        offset += count
    return flat[offset:].to(extra.device)


def broadcast_parameters(parameters: list[torch.Tensor], group: ProcessGroup) -> None:
    """Give every process rank 0's values of ``parameters``."""
    if not group.active:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for parameter in parameters:
            dist.broadcast(parameter.data, src=0)


def barrier(group: ProcessGroup) -> None:
    if group.active:
        import torch.distributed as dist

        dist.barrier()


@contextmanager
def main_process_first(group: ProcessGroup):
    """Rank 0 runs the block first (it may write files), the others after it has finished."""
    if not group.main:
        barrier(group)
    yield
    if group.main:
        barrier(group)


def check_same_weights(parameters: list[torch.Tensor], group: ProcessGroup) -> None:
    """``RuntimeError`` unless every process holds the same ``parameters`` (bit for bit)."""
    if not group.active:
        return
    import torch.distributed as dist

    with torch.no_grad():
        high = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in parameters])
        low = high.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
    if not torch.equal(high, low):
        raise RuntimeError("the processes hold different scorer weights after training; every process must "
                           "run the same code, data and settings")


def shard_language_model(model, group: ProcessGroup) -> tuple[int, int]:
    """Shard the frozen language model's weights over the processes (PyTorch FSDP2), in place.

    Each decoder layer, and the input and output embeddings unless they share their weight, is
    split across the processes and gathered only while it runs, forward and backward; the
    scorer, the vision side and the rest stay whole on every process. The model stays sharded.
    Every process must then run the same number of forward and backward passes per step
    (:class:`~visionselector.data.batches.ExampleBatches` with ``lockstep=True`` sees to that).

    Returns ``(parameters this process holds, parameters sharded)`` of the sharded modules.
    """
    from torch.distributed.fsdp import fully_shard
    from transformers.modeling_layers import GradientCheckpointingLayer

    from ..adapters import find_adapter

    if not group.active:
        raise ValueError("sharding the model needs several processes: start them with torchrun or accelerate launch")
    adapter = find_adapter(model)
    text_model = adapter.text_model(adapter.core(model))
    modules = [m for m in text_model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not modules:
        raise ValueError(f"{type(text_model).__name__} has no decoder layers to shard")
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if outputs is None or outputs.weight is not inputs.weight:  # a tied pair stays whole rather than split twice
        modules += [m for m in (inputs, outputs) if m is not None]
    total = sum(p.numel() for m in modules for p in m.parameters())
    for module in modules:
        fully_shard(module)
    held = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
               for m in modules for p in m.parameters())
    return held, total
