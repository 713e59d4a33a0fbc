"""Data-parallel inference under torchrun: one process per device, each running its share of
the global batch.

torchrun (or `python3 -m torch.distributed.run`) starts the processes and sets RANK,
WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; a plain `python3 script.py` sets none of them
and runs as one process with no process group, exactly as before. The collectives go
through NCCL on GPUs (ROCm's RCCL is also "nccl" in torch) and gloo on the CPU.

The sweep (engine/sweep.py) uses three collectives per batch size, in the same order on every
rank whatever happens: `all_ok` after building the runner (everyone starts warming up
together, or everyone skips a size one rank could not build), `agree` just before the timed
loop (everyone starts timing together, with rank 0's iteration count), and
`all_gather_object` of the rows, from which rank 0 writes the results.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import List, Mapping, Optional, Sequence

import torch

from . import EngineError

FAILED = -1  # what a rank that could not run passes to `agree`
REFUSE_GRACE_S = 10.0


class PeerFailed(RuntimeError):
    """Another rank could not run this batch size (it ran out of memory)."""


SHARE_GPU_ENV = "VIT_SHARE_GPU"


def sharing_gpu() -> bool:
    """VIT_SHARE_GPU=1 lets several processes share one GPU: a functional check of the
    data-parallel flow on a one-GPU machine, not a measurement of scaling."""
    return os.environ.get(SHARE_GPU_ENV) == "1"


def backend_for(target) -> str:
    """NCCL on GPUs, CUDA and ROCm alike (RCCL answers to "nccl"); gloo on the CPU, and when
    processes share a GPU (NCCL refuses two ranks on one device)."""
    return "nccl" if target.is_gpu and not sharing_gpu() else "gloo"


@dataclass
class Group:
    """This process's place among the torchrun processes; the defaults are a plain single run."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # collectives' tensors
    initialized: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- starting and stopping ---------------------------------------------------------------

    def init(self, target) -> "Group":
        """Join the process group torchrun prepared (env://); a single process does nothing."""
        if not self.enabled or self.initialized:
            return self
        import torch.distributed as dist
        if target.is_gpu and self.local_world_size > torch.cuda.device_count() and not sharing_gpu():
            self._refuse(f"{self.local_world_size} processes per node but {torch.cuda.device_count()} "
                         f"GPU(s) visible ({target.visible_devices_var}={os.environ.get(target.visible_devices_var, 'unset')})")
        backend = backend_for(target)
        kwargs = {"device_id": target.device} if backend == "nccl" else {}
        dist.init_process_group(backend, **kwargs)
        self.device = target.device if backend == "nccl" else torch.device("cpu")
        self.initialized = True
        return self

    def shutdown(self):
        if self.initialized:
            import torch.distributed as dist
            self.barrier()
            dist.destroy_process_group()
            self.initialized = False

    def _refuse(self, message: str):
        """An error every rank finds alike: rank 0 says it in one line, the others leave quietly,
        after giving rank 0 time to say it (torchrun stops every process once one has failed)."""
        if self.is_main:
            raise EngineError(message)
        time.sleep(REFUSE_GRACE_S)
        raise SystemExit(1)

    # --- the batch -------------------------------------------------------------------------

    def global_sizes(self, batch_size: int, sweep: Sequence[int]) -> List[int]:
        """The global batch sizes to run: `batch_size` (0: the sweep), each split evenly over the
        ranks. An explicit size that does not split is refused; the sweep keeps those that do."""
        if batch_size:
            if batch_size % self.world_size:
                self._refuse(f"--batch-size {batch_size} is the global batch and must split evenly over "
                             f"{self.world_size} devices (use a multiple of {self.world_size})")
            return [batch_size]
        return [b for b in sweep if b % self.world_size == 0]

    def local_batch(self, global_batch: int) -> int:
        return global_batch // self.world_size

    # --- collectives (no-ops in a single process) ------------------------------------------

    def _all_gather_ints(self, value: int) -> List[int]:
        import torch.distributed as dist
        mine = torch.tensor([value], dtype=torch.int64, device=self.device)
        every = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine)
        return [int(t.item()) for t in every]  # .item() waits: every rank has arrived

    def barrier(self):
        if self.enabled:
            self._all_gather_ints(0)

    def all_ok(self, ok: bool) -> bool:
        """True on every rank when `ok` is true on every rank (and everyone has arrived)."""
        if not self.enabled:
            return ok
        return all(self._all_gather_ints(int(bool(ok))))

    def agree(self, iters: int, check: bool = True) -> int:
        """Wait for every rank, then all take rank 0's iteration count. A rank that failed passes
        FAILED; the others then raise PeerFailed (unless `check` is false)."""
        if not self.enabled:
            return iters
        every = self._all_gather_ints(iters)
        if check and any(v == FAILED for v in every):
            raise PeerFailed(f"rank(s) {', '.join(str(r) for r, v in enumerate(every) if v == FAILED)} failed")
        return every[0]

    def all_gather_object(self, obj) -> list:
        if not self.enabled:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def _env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    value = environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise EngineError(f"{name}={value!r} is not an integer (torchrun sets it)") from None


def from_env(environ: Optional[Mapping[str, str]] = None) -> Group:
    """This process's Group from torchrun's variables; none set means a single process."""
    environ = os.environ if environ is None else environ
    world = _env_int(environ, "WORLD_SIZE", 1)
    rank = _env_int(environ, "RANK", 0)
    local_rank = _env_int(environ, "LOCAL_RANK", rank)
    local_world = _env_int(environ, "LOCAL_WORLD_SIZE", world)
    if world < 1 or not 0 <= rank < world or not 0 <= local_rank < max(local_world, 1):
        raise EngineError(f"inconsistent torchrun variables: RANK={rank} WORLD_SIZE={world} "
                          f"LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_world}")
    return Group(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world)


def setup(device: Optional[str] = None):
    """(Group, Target) for this process: the local rank picks the device; the notice about
    running on the CPU comes from rank 0 only. Call `group.init(target)` once the batch sizes
    are checked, so a refused size never opens connections."""
    from .target import detect
    group = from_env()
    target = detect(device, local_rank=group.local_rank, quiet=not group.is_main)
    return group, target
