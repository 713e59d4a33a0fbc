"""Numerical verification of the engine against TIMM's own model in float32.

The standard (DESIGN.md): relative error ||y - ref|| / ||ref||, max abs error over the logit
scale and top-1 agreement, NaN/Inf always fail; a low-precision engine must also stay within
a small multiple of the error plain PyTorch makes in the same dtype (as flash-attn's tests
judge kernels). All tolerances live in TOLERANCES below.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch

from modeling import ops


@dataclass(frozen=True)
class Tolerance:
    rel: float            # ||y - ref|| / ||ref|| at most
    max_scaled: float     # max |y - ref| / max |ref| at most
    multiple: float       # rel error at most this multiple of plain PyTorch's in the same dtype
    floor: float          # ... unless it is below this absolute floor


TOLERANCES = {
    torch.float32: Tolerance(rel=2e-5, max_scaled=1e-4, multiple=0.0, floor=0.0),
    torch.float16: Tolerance(rel=1e-2, max_scaled=3e-2, multiple=3.0, floor=1e-3),
    torch.bfloat16: Tolerance(rel=6e-2, max_scaled=2e-1, multiple=3.0, floor=8e-3),
}


@dataclass
class Report:
    rel_err: float
    max_err_scaled: float
    top1_agreement: float
    top1_unexplained: int          # top-1 flips where the reference's margin exceeds the error
    baseline_rel_err: Optional[float]
    samples: int
    failures: List[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        base = "" if self.baseline_rel_err is None else f" (plain PyTorch same dtype: {self.baseline_rel_err:.2e})"
        return (f"relative error {self.rel_err:.2e}{base}, max error / logit scale {self.max_err_scaled:.2e}, "
                f"top-1 agreement {self.top1_agreement * 100:.1f}% of {self.samples}")


def compare(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
            baseline: Optional[torch.Tensor] = None) -> Report:
    tol = TOLERANCES[dtype]
    out, ref = out.double().cpu(), ref.double().cpu()
    failures = []
    finite = torch.isfinite(out)
    if not finite.all():
        bad = (~finite).nonzero()[0].tolist()
        failures.append(f"non-finite output ({int((~finite).sum())} values, first at sample {bad[0]}, class {bad[1]})")
        out = torch.where(finite, out, torch.zeros_like(out))
    if not torch.isfinite(ref).all():
        failures.append("non-finite output of TIMM's reference model (are the source weights finite?)")
        ref = torch.nan_to_num(ref, nan=0.0, posinf=0.0, neginf=0.0)
    diff = out - ref
    rel = (diff.norm() / ref.norm().clamp_min(1e-30)).item()
    max_scaled = (diff.abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    agree = out.argmax(-1) == ref.argmax(-1)
    top2 = ref.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    per_sample_err = diff.abs().amax(dim=-1)
    unexplained = int((~agree & (margin > 2 * per_sample_err)).sum())
    base_rel = None
    if baseline is not None:
        base_rel = ((baseline.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    if not rel <= tol.rel:  # written so that NaN fails too
        failures.append(f"relative error {rel:.2e} > {tol.rel:.0e}")
    if not max_scaled <= tol.max_scaled:
        failures.append(f"max error / logit scale {max_scaled:.2e} > {tol.max_scaled:.0e}")
    if base_rel is not None and tol.multiple and rel > max(tol.multiple * base_rel, tol.floor):
        failures.append(f"relative error {rel:.2e} > {tol.multiple:g} x plain PyTorch's {base_rel:.2e}")
    if unexplained:
        failures.append(f"top-1 differs on {unexplained} samples where the reference margin exceeds the error")
    return Report(rel, max_scaled, agree.double().mean().item(), unexplained, base_rel, out.shape[0], failures)


@torch.no_grad()
def first_nonfinite(model, images) -> Optional[str]:
    """Run the engine stage by stage (eagerly) and name the first stage with NaN/Inf (None: no stage)."""
    batch = images.shape[0]
    with ops.sdpa_backend(model.plan.attention):
        x = model.embed(images)
        if not torch.isfinite(x).all():
            return "the patch embedding"
        for i, block in enumerate(model.blocks):
            x = block(x, batch, model.plan)
            if not torch.isfinite(x).all():
                return f"block {i}"
        pooled = model.pool(x, batch)
        if not torch.isfinite(pooled).all():
            return "the final norm / pooling"
        if model.head is not None and not torch.isfinite(model.head(pooled, model.plan)).all():
            return "the classifier head"
    return None


def random_images(cfg, batch: int, seed: int, device) -> torch.Tensor:
    """Noise plus a per-image colour cast: pure noise averages out over the patches, which would
    leave every image with nearly the same logits; a cast survives pooling, as image content does."""
    gen = torch.Generator().manual_seed(seed + 12345)
    images = torch.randn(batch, cfg.in_chans, *cfg.img_size, generator=gen)
    images += torch.randn(batch, cfg.in_chans, 1, 1, generator=gen)
    return images.to(device)


@torch.no_grad()
def run_verification(cfg, state, source_model, target, dtype, batch, options, seed=0, cache_root=None,
                     log=print) -> Report:
    """Build and compile the engine from `state`, run it on seeded random images, and compare it
    with TIMM's `source_model` in float32 on the same device (TF32 off) and in `dtype`."""
    import copy

    from weight_utils import build_engine

    from .compile import DEFAULT_CACHE_ROOT, compile_engine
    model = build_engine(cfg, state, dtype, target.device)
    engine = compile_engine(model, batch, target, options, cache_root or DEFAULT_CACHE_ROOT, log=log)
    images = random_images(cfg, batch, seed, target.device)
    out = engine(images.to(dtype)).float()
    reference = source_model.to(target.device)
    ref = reference(images).float()
    baseline = None
    if dtype != torch.float32:
        # plain PyTorch as it runs by default: --use-fp16-acc must not loosen its own yardstick
        fp16_acc = getattr(torch.backends.cuda.matmul, "allow_fp16_accumulation", False)
        if fp16_acc:
            torch.backends.cuda.matmul.allow_fp16_accumulation = False
        try:
            baseline = copy.deepcopy(reference).to(dtype)(images.to(dtype)).float()
        finally:
            if fp16_acc:
                torch.backends.cuda.matmul.allow_fp16_accumulation = True
    report = compare(out, ref, dtype, baseline)
    if not torch.isfinite(out).all():
        where = first_nonfinite(model, images.to(dtype))
        report.failures[0] += (f"; it first appears in the output of {where}" if where else
                               "; no stage gives it when run one by one, only the compiled run")
    source_model.to("cpu")
    return report
