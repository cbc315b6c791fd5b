"""A meta-training process's place in a :mod:`torch.distributed` run, and the collectives it uses.

Every rank runs its share of each meta-batch; :func:`all_reduce_meta_gradients` sums the
meta-gradients (with a not-finite flag and the loss sum, in one flat float64 buffer) so that every
rank takes the same meta-step. A collective that fails because another rank died or stopped
answering becomes a :class:`~l2o.meta.MetaTrainingError` naming the meta-step and what was kept.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Callable, NoReturn, Sequence

import torch
from torch import Tensor

from .result import MetaTrainingError

__all__ = ["Distributed", "all_reduce_meta_gradients", "to_cpu", "end_distributed_process"]


class Distributed:
    """This process's place in a distributed run (``active`` False: a single process)."""

    #: Set once a collective of this process has failed: its process group is broken, and
    #: destroying it can abort the process (the l2o commands then leave it to the OS at exit).
    failed = False

    def __init__(self, requested: bool | None) -> None:
        import torch.distributed as dist

        initialised = dist.is_available() and dist.is_initialized()
        if requested not in (None, True, False):
            raise TypeError(f"distributed must be True, False or None, got {requested!r}")
        if requested and not initialised:
            raise ValueError("distributed=True needs torch.distributed to be initialised first: launch with torchrun "
                             "and call torch.distributed.init_process_group() (the l2o commands do it with "
                             "--distributed)")
        self.active = bool(initialised if requested is None else requested)
        if not self.active and initialised and dist.get_world_size() > 1:
            warnings.warn(f"torch.distributed is initialised with {dist.get_world_size()} ranks but meta_train runs "
                          "with distributed=False: every rank trains on its own (pass distributed=True to share the "
                          "meta-batch)", RuntimeWarning, stacklevel=3)
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1
        self.backend = str(dist.get_backend()) if self.active else None
        self.step = 0  # the meta-step in progress, for error messages
        self.state_path: str | None = None

    def share(self, tasks_per_step: int) -> range:
        """This rank's tasks ``s`` within each meta-batch of ``tasks_per_step``."""
        if tasks_per_step % self.world:
            raise ValueError(f"tasks_per_step ({tasks_per_step}) must be a multiple of the number of ranks "
                             f"({self.world}): each rank runs tasks_per_step / world_size tasks of every meta-batch")
        share = tasks_per_step // self.world
        return range(self.rank * share, (self.rank + 1) * share)

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run a collective; turn its failure (a dead or hung rank) into a MetaTrainingError."""
        try:
            return fn()
        except Exception as exc:  # gloo/nccl errors: DistBackendError, RuntimeError, ConnectionError
            Distributed.failed = True
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            if self.state_path is None:
                kept = "no training state was being written"
            elif os.path.isfile(self.state_path):
                kept = f"the last training state in {self.state_path} is intact; resume from it with the same arguments"
            else:
                kept = f"no training state had been written to {self.state_path} (on this host) yet"
            raise MetaTrainingError(
                f"distributed meta-training failed on rank {self.rank} of {self.world} at meta-step {self.step}: "
                f"{what} with the other ranks did not complete ({type(exc).__name__}: {first}). Another rank has "
                f"probably died or stopped answering within the process group's timeout; {kept}") from exc

    def device(self) -> torch.device:
        """Where collective buffers live: the CUDA device for nccl, else the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_reduce(self, buffer: Tensor, what: str) -> Tensor:
        """Sum ``buffer`` over the ranks, in place."""
        import torch.distributed as dist

        self._call(what, lambda: dist.all_reduce(buffer))
        return buffer

    def gather(self, obj: Any, what: str) -> list[Any] | None:
        """``obj`` of every rank, in rank order, on rank 0 (``None`` elsewhere)."""
        import torch.distributed as dist

        out = [None] * self.world if self.rank == 0 else None
        self._call(what, lambda: dist.gather_object(obj, out, dst=0))
        return out


def all_reduce_meta_gradients(dist: Distributed, meta_params: Sequence[torch.nn.Parameter], bad: bool,
                              loss_sum: float) -> tuple[bool, float]:
    """Sum the meta-gradients, the not-finite flags and the loss sums of all ranks with one
    ``all_reduce`` of a flat float64 buffer; the summed gradients replace every rank's own."""
    device = dist.device()
    parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).to(device, torch.float64)
             for p in meta_params]
    parts.append(torch.tensor([1.0 if bad else 0.0, loss_sum], dtype=torch.float64, device=device))
    buffer = dist.all_reduce(torch.cat(parts), "the all-reduce of the meta-gradients")
    offset = 0
    for p in meta_params:
        n = p.numel()
        chunk = buffer[offset:offset + n].view(p.shape)
        offset += n
        if p.grad is not None:
            p.grad.copy_(chunk)
        elif bool(chunk.ne(0).any()):  # only another rank's tasks reached this meta-param
            p.grad = chunk.to(p.device, p.dtype).clone()
    flags = buffer[offset:].tolist()
    return flags[0] > 0, flags[1]


def to_cpu(value: Any) -> Any:
    """``value`` with every tensor (in dicts, lists and tuples) copied to the CPU (for gathering)."""
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple
        return type(value)(*(to_cpu(v) for v in value))
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


def end_distributed_process(code: int = 0) -> NoReturn:
    """End a process that ran gloo collectives: flush stdout/stderr and leave with ``os._exit(code)``.

    With torch 2.13, interpreter finalisation after a gloo process group was used aborts the
    process now and then ("terminate called without an active exception", SIGABRT, exit -6: gloo's
    worker threads release Python objects while the interpreter is torn down; see pytorch PR
    179291). Destroy the process group first (when it is healthy), then call this instead of
    returning, so a finished run reports its real exit code. ``atexit`` handlers do not run.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or redirected away
            pass
    os._exit(code)
