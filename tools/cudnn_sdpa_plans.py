"""cuDNN's own attention plans at the engine's shapes: every plan its heuristics offer (modes A, B
and fallback) and every engine x knob setting it lists, built through cuDNN's frontend (the
`cudnn` Python package, nvidia-cudnn-frontend), each timed in CUDA graphs as the plan times
attention and checked against the float32 reference, beside torch's SDPA on cuDNN (one plan,
torch's pick: what the engine runs today).

    python3 tools/cudnn_sdpa_plans.py [MODEL:BATCH ...]     (default: ViT-B/16 batch 64 and 256)

The frontend is not a dependency of the engine; on a machine without it, put an unpacked wheel
on PYTHONPATH.
"""
import itertools
import sys
import time

import torch
import cudnn

from engine.compile import graphed_ms
from modeling import ops
from modeling.config import vit_config

dev = torch.device("cuda")
shapes = [a.split(":") for a in sys.argv[1:]] or [("vit_base_patch16_224", 64), ("vit_base_patch16_224", 256)]
MAX_CONFIGS_PER_ENGINE = 48
print("cudnn backend", cudnn.backend_version(), "frontend", getattr(cudnn, "__version__", "?"))


def timed(fn):
    return graphed_ms(fn, dev, budget_s=0.12)


handle = cudnn.create_handle()


def build(q, k, v, o, scale, engine=None, knobs=None):
    """One SDPA graph on these strided tensors; with `engine`, that engine and knob setting only."""
    g = cudnn.pygraph(io_data_type=cudnn.data_type.HALF, intermediate_data_type=cudnn.data_type.FLOAT,
                      compute_data_type=cudnn.data_type.FLOAT, handle=handle)
    tq, tk, tv = g.tensor_like(q), g.tensor_like(k), g.tensor_like(v)
    to, _ = g.sdpa(name="sdpa", q=tq, k=tk, v=tv, is_inference=True, attn_scale=scale)
    to.set_output(True).set_dim(list(o.shape)).set_stride(list(o.stride()))
    g.validate()
    g.build_operation_graph()
    if engine is None:
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK])
    else:
        g.create_execution_plan(engine, knobs)
    g.check_support()
    g.build_plans(cudnn.build_plan_policy.ALL)
    return g, {tq: q, tk: k, tv: v, to: o}


for name, batch in shapes:
    batch = int(batch)
    cfg = vit_config(name, "ait")
    seq, heads, hd = cfg.seq_len, cfg.num_heads, cfg.head_dim
    flops = 4 * batch * heads * seq * seq * hd
    qkv = torch.randn(batch * seq, 3 * heads * hd, device=dev, dtype=torch.float16)
    want = ops.attention_reference(qkv, batch, heads, hd).float()
    q, k, v = ops.split_qkv(qkv, batch, heads, hd)
    out = torch.empty(batch * seq, heads * hd, device=dev, dtype=torch.float16)
    o = out.view(batch, seq, heads, hd).permute(0, 2, 1, 3)  # the proj GEMM's input layout
    rows = []

    def torch_cudnn():
        with ops.sdpa_backend("cudnn"):
            return ops.attention(qkv, batch, heads, hd, "cudnn")
    rows.append(("torch sdpa cudnn", timed(torch_cudnn), (torch_cudnn().float() - want).abs().max().item()))

    def add_plans(g, pack, label):
        for i in range(g.get_execution_plan_count()):
            try:
                ws = torch.empty(max(1, g.get_workspace_size_plan_at_index(i)), device=dev, dtype=torch.uint8)

                def fn(i=i, ws=ws):
                    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
                    g.execute_plan_at_index(pack, ws, i, handle=handle)
                    return out
                out.fill_(float("nan"))
                err = (fn().float() - want).abs().max().item()
                rows.append((f"{label} [{i}] {g.get_plan_name_at_index(i)}", timed(fn), err))
            except Exception as e:  # noqa: BLE001 - a plan that does not build or run
                print(f"  {label} [{i}]: {type(e).__name__} {str(e).splitlines()[0][:100]}")

    t0 = time.time()
    g, pack = build(q, k, v, o, hd ** -0.5)
    add_plans(g, pack, "heuristic")
    engines = g.get_engine_count()
    print(f"== {name} batch {batch}: {g.get_execution_plan_count()} heuristic plans, {engines} engines")
    for engine in range(engines):
        try:
            knobs = g.get_knobs_for_engine(engine)
        except Exception as e:  # noqa: BLE001
            print(f"  engine {engine}: no knobs ({str(e).splitlines()[0][:80]})")
            continue
        ranges = [[(kn.type, val) for val in range(kn.min_value, kn.max_value + 1, max(1, kn.stride))]
                  for kn in knobs]
        print(f"  engine {engine}: knobs " + ", ".join(f"{kn.type.name} {kn.min_value}..{kn.max_value}/{kn.stride}"
                                                     for kn in knobs))
        for combo in itertools.islice(itertools.product(*ranges), MAX_CONFIGS_PER_ENGINE):
            label = f"engine {engine} " + ",".join(f"{t.name}={val}" for t, val in combo)
            try:
                ge, pack_e = build(q, k, v, o, hd ** -0.5, engine, dict(combo))
            except Exception:  # noqa: BLE001 - unsupported at this shape
                continue
            add_plans(ge, pack_e, label)
    rows.sort(key=lambda r: r[1])
    print(f"== {name} batch {batch} (T={seq}, H={heads}, hd={hd}, {flops / 1e9:.1f} GFLOP per layer), "
          f"{len(rows)} timed in {time.time() - t0:.0f} s")
    for label, ms, err in rows[:15] + [r for r in rows[15:] if r[0].startswith("torch")]:
        print(f"  {label[:90]:90s} {ms * 1e3:8.1f} us  {flops / ms / 1e9:6.1f} TFLOP/s  max err {err:.1e}")
    sys.stdout.flush()
