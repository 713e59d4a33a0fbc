"""Run under torchrun by test_distributed.py: a sweep where rank 1 runs out of memory while
building (batch 2), while warming up (batch 4) and inside the timed loop (batch 6), and rank 0
never does. Every rank must keep its collectives in step (no hang) and batch 8 must still run."""
import json
import os
import sys

import torch

from engine.distributed import setup
from engine.sweep import run_sweep


class Cfg:
    model_name, variant = "fake", "ait"

    def flops(self, batch):
        return 1e6 * batch


def main(out_dir):
    group, target = setup("cpu")
    group.init(target)
    agreed = []
    agree = group.agree
    group.agree = lambda n, check=True: agreed.append(n) or agree(n, check)

    def make_runner(local):
        agreed.clear()  # from here on, `agreed` says whether this batch's timed loop has begun
        oom = group.rank == 1
        if oom and local == 1:
            raise torch.cuda.OutOfMemoryError("build")
        calls = []

        def fn():
            calls.append(1)
            if oom and local == 2:
                raise torch.cuda.OutOfMemoryError("warm-up")
            if oom and local == 3 and agreed and len(calls) > 3:
                raise torch.cuda.OutOfMemoryError("timed loop")
            return torch.ones(local).sum()
        return fn, {}

    complete = run_sweep("fake", "fake", Cfg(), target, torch.float32, [2, 4, 6, 8], make_runner, out_dir, "stem",
                         "none", log=lambda m: print(m, file=sys.stderr),
                         timing_kwargs={"warmup_s": 0.01, "budget_s": 0.01, "min_iters": 5}, group=group)
    print(json.dumps({"rank": group.rank, "complete": complete}))
    group.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
    # Leave without the interpreter's teardown: after destroy_process_group, gloo's worker threads
    # have been seen to abort the process at finalization ("terminate called without an active
    # exception", about one run in ten under load), after every check here had passed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
