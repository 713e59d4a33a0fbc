"""What bounds modeling/cuda_attention.py: its time with parts of the kernel switched off (the PROBE
bits in its source), in CUDA graphs at ViT-B/16's shape. perf-notes attempt 52.

    python3 tools/attention_probe.py [BATCH ...] [VARIANT ...] [NAME=VALUE ...]
    (default 64 256; variants: ca.KNOWN_VARIANTS; NAME=VALUE: #defines before the source, PROBE excepted)

Rows: "full" the kernel as the engine runs it; "no tail" without the last query tile's MMAs and
softmax (196 tokens: rows 192-255, 4 of them real); "compute only" without global memory (loads after
the first stages and the stores switched off); "loads only" without any MMA, softmax or store;
"loads and stores" without any MMA or softmax; "no stores" without the output (tile or stores); "no TMA
stores" with the tile written, not stored; "no output tile writes" with the stores issued from an
unwritten tile; "no row sums" without the softmax's FP32 sums. Where the output is switched off, the
kernel still reads P V's results: before attempt 65 ptxas dropped those MMAs from "no stores" and
"compute only", whose times then left P V out. The switched-off rows compute wrong numbers: they are
timings, nothing else.
"""
import re
import sys

import torch

from engine.compile import graphed_ms
from modeling import cuda_attention as ca

PROBES = {"full": 0, "no tail": 1, "no stores": 8, "no TMA stores": 32, "no output tile writes": 64,
          "no row sums": 128, "compute only": 2 | 8, "compute only, no tail": 1 | 2 | 8, "loads only": 4 | 8,
          "loads and stores": 16}
dev = torch.device("cuda")
source = ca.source


def timed(fn):
    return graphed_ms(fn, dev, budget_s=0.3)


def defines_from(args) -> str:
    """NAME=VALUE arguments as #define lines; a name the kernel's source does not read is an error."""
    pairs = [a.split("=", 1) for a in args if "=" in a]
    unknown = [name for name, _ in pairs if not re.search(rf"#ifndef {re.escape(name)}\b", source(196, 12))]
    if unknown:
        sys.exit(f"error: the kernel's source has no define {', '.join(unknown)}")
    return "".join(f"#define {name} {value}\n" for name, value in pairs)


def main(batches, variants, defines=""):
    seq, heads = 196, 12
    for batch in batches:
        qkv = torch.randn(batch * seq, 3 * heads * 64, device=dev, dtype=torch.float16)
        out = torch.empty(batch * seq, heads * 64, device=dev, dtype=torch.float16)
        floor_us = (qkv.numel() + out.numel()) * 2 / 3.0e12 * 1e6
        for variant in variants:
            cells = []
            for label, bits in PROBES.items():
                ca.source = lambda *a, bits=bits, **k: f"{defines}#define PROBE {bits}\n" + source(*a, **k)
                ca._kernel.cache_clear()
                ms = timed(lambda: ca.attention(qkv, batch, heads, out=out, variant=variant))
                cells.append(f"{label} {ms * 1e3:.1f}")
            per_head = batch * heads / torch.cuda.get_device_properties(dev).multi_processor_count
            print(f"batch {batch} {variant}{' ' + defines.strip() if defines else ''} ({per_head:.1f} heads per SM; 3 TB/s floor {floor_us:.0f} us), us: "
                  + "; ".join(cells), flush=True)


if __name__ == "__main__":
    try:
        main([int(a) for a in sys.argv[1:] if a.isdigit()] or (64, 256),
             [a for a in sys.argv[1:] if not a.isdigit() and "=" not in a] or ca.KNOWN_VARIANTS,
             defines_from(sys.argv[1:]))
    finally:  # the engine's own source back, whatever happened
        ca.source = source
        ca._kernel.cache_clear()
