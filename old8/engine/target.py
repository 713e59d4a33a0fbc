"""Which device this run uses: CUDA, ROCm (torch.version.hip) or CPU, and what that implies."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from . import EngineError


@dataclass(frozen=True)
class Target:
    kind: str                  # "cuda" | "rocm" | "cpu"
    device: torch.device
    name: str                  # GPU name, or "cpu"

    @property
    def is_gpu(self) -> bool:
        return self.kind != "cpu"

    @property
    def visible_devices_var(self) -> str:
        return "HIP_VISIBLE_DEVICES" if self.kind == "rocm" else "CUDA_VISIBLE_DEVICES"

    @property
    def attention_backends(self):
        """SDPA backends worth measuring here. cuDNN attention is CUDA-only."""
        if self.kind == "cuda":
            return ("cudnn", "flash", "efficient", "triton")
        if self.kind == "rocm":
            return ("flash", "efficient", "triton")
        return ("math",)

    @property
    def graphs_by_default(self) -> bool:
        """CUDA graphs on by default on CUDA; off on ROCm, as the original example ran there."""
        return self.kind == "cuda"

    def use_graph(self, requested: Optional[bool] = None) -> bool:
        """--use-graph: None takes the target's default; graphs exist only on a GPU."""
        return self.is_gpu and (self.graphs_by_default if requested is None else bool(requested))

    @property
    def default_dtype(self) -> torch.dtype:
        return torch.float16 if self.is_gpu else torch.float32


def gpu_kind() -> str:
    return "rocm" if getattr(torch.version, "hip", None) else "cuda"


def detect(device: Optional[str] = None, local_rank: int = 0, quiet: bool = False) -> Target:
    """`device` None picks the GPU when there is one, else the CPU with a notice."""
    has_gpu = torch.cuda.is_available()
    if device is None:
        device = "cuda" if has_gpu else "cpu"
        if not has_gpu and not quiet:
            print("notice: no GPU found, running on the CPU (reference path, float32)", file=sys.stderr)
    if device in ("cuda", "gpu", "rocm", "hip"):
        if not has_gpu:
            var = "HIP_VISIBLE_DEVICES" if gpu_kind() == "rocm" else "CUDA_VISIBLE_DEVICES"
            raise EngineError(f"--device {device}: no GPU is visible to torch "
                              f"(torch {torch.__version__}, {var}={os.environ.get(var, 'unset')})")
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return Target(gpu_kind(), torch.device("cuda", index), torch.cuda.get_device_name(index))
    if device == "cpu":
        return Target("cpu", torch.device("cpu"), "cpu")
    raise EngineError(f"--device {device}: unknown device (use cpu or cuda)")


def visible_devices_flag(target: Target) -> str:
    """The results-file suffix of the original example: the visible-devices list, ',' -> '_', or -1."""
    value = os.environ.get(target.visible_devices_var) or os.environ.get("CUDA_VISIBLE_DEVICES")
    return value.replace(",", "_") if value else "-1"
