import os
import sys

# Triton kernels run on the CPU through Triton's interpreter; this must be set before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import modeling  # noqa: E402,F401  (registers vit_micro_patch8_32 with TIMM)
