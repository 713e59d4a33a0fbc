"""What could the CUDA attention kernel still give a whole forward at the power cap? (perf-notes
attempt 65.) Whole ViT forwards with the measured plan, sustained and alternating, with the kernel
built as the engine runs it and with parts of it switched off by its PROBE bits: the tail query
tile (196 tokens: rows 192-255, 4 real), the output stores, or all global traffic after the first
heads, or the softmax's row sums (FP32 adds and shuffles). The switched-off forwards' logits are
wrong by design (without its stores the proj GEMM reads what the slot held before: norm1's output);
their time and energy are bounds for a kernel that did that part for free, data effects aside.
Attempt 65's kernel options (L2 hints, per-warp stores, row sums by MMA) ran through this in commit
e951ed2.

    python3 tools/attention_whatif.py MODEL:BATCH [ROUNDS]
"""
from functools import partial
from unittest import mock

import modeling  # noqa: F401
from modeling import cuda_attention as ca
from power_probe import whatif_cli, whatif_forwards

# label: defines put before the kernel's source (PROBE bits: see its source)
WHATIFS = {"plan": "", "no tail tile": "#define PROBE 1\n", "no output (P V kept)": "#define PROBE 8\n",
           "no output stores (tile written)": "#define PROBE 32\n", "no row sums": "#define PROBE 128\n",
           "no global traffic (P V kept)": "#define PROBE 10\n"}


def main(spec, rounds=3):
    def variants(model, plan, images, arena):
        if plan.attention != "cuda":
            raise SystemExit(f"the plan's attention is {plan.attention!r}, not the CUDA kernel: nothing to probe")
        source, build = ca.source, ca._kernel.__wrapped__
        kept = {}  # every build stays loaded until the timings end: the graphs launch them

        def built_with(defines):
            def kernel(*key):
                if (defines, key) not in kept:
                    ca.source = lambda *a, **k: defines + source(*a, **k)
                    try:
                        kept[defines, key] = build(*key)
                    finally:
                        ca.source = source
                return kept[defines, key]
            return partial(mock.patch.object, ca, "_kernel", kernel)
        return {label: built_with(defines) for label, defines in WHATIFS.items()}
    whatif_forwards(spec, rounds, variants)


if __name__ == "__main__":
    whatif_cli(main, __doc__)
