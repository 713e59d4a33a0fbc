"""Power, clocks and energy under sustained load, read through NVML (ctypes on the driver's
libnvidia-ml; no extra package). perf-notes attempt 45.

Why: the notes say large batches are bound by the H100's 700 W cap, so the time of a forward is its
energy divided by the cap, and the kernel that wins a short timing need not be the one that uses the
least energy. This measures both, per whole forward and per candidate of each plan site.

    python3 tools/power_probe.py forward MODEL:BATCH[:DTYPE] ...   engine graph and TIMM eager, sustained
    python3 tools/power_probe.py sites MODEL:BATCH [CLOSE=0.08] [SITE,...]   each site's candidates within
                                                     CLOSE of its best short timing, sustained alone
    python3 tools/power_probe.py alone MODEL:BATCH SITE NAME ...  named candidates of one site, sustained alone
    python3 tools/power_probe.py swaps MODEL:BATCH SITE=NAME ...    the measured plan and each one-site
                                                     swap, whole forwards sustained in alternation
    python3 tools/power_probe.py data MODEL:BATCH SITE NAME ...  named candidates of one site, sustained
                                                     alone on random inputs and on a forward's own ones
    python3 tools/power_probe.py plans MODEL:BATCH FILE|compile ... whole plans (a plan cache file, a results
                                                     JSON's row for BATCH, or one measured now from an
                                                     empty cache), whole forwards sustained in alternation
    python3 tools/power_probe.py ramp                  clock, power and the energy counter from idle into
                                                     a GEMM load, sampled every few milliseconds

Each measurement warms the GPU up for WARM_S, then replays for HOLD_S while a thread samples power
and the SM clock; energy comes from the board's cumulative counter (millijoules) read before and
after. "reasons" ORs the clock-event reasons seen (0x4 software power cap, 0x20/0x40 thermal).
"""
import ctypes
import json
import statistics
import sys
import tempfile
import threading
import time

import torch

import modeling  # noqa: F401
import weight_utils as wu
from engine import compile as cp
from engine.target import detect
from modeling import ops
from modeling.config import vit_config

WARM_S, HOLD_S = 1.0, 2.0


class Nvml:
    def __init__(self, device: int = 0):
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        self._ok(self.lib.nvmlInit_v2(), "init")
        self.handle = ctypes.c_void_p()
        props = torch.cuda.get_device_properties(device)
        status = -1
        if hasattr(props, "pci_bus_id"):  # NVML numbers GPUs its own way (CUDA_VISIBLE_DEVICES, ordering)
            bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0".encode()
            status = self.lib.nvmlDeviceGetHandleByPciBusId_v2(bus, ctypes.byref(self.handle))
        if status != 0:  # no PCI id from torch, or NVML did not take it: same numbering assumed
            self._ok(self.lib.nvmlDeviceGetHandleByIndex_v2(device, ctypes.byref(self.handle)), "handle")
        reasons = getattr(self.lib, "nvmlDeviceGetCurrentClocksEventReasons", None)
        self._reasons = reasons or self.lib.nvmlDeviceGetCurrentClocksThrottleReasons

    @staticmethod
    def _ok(status, what):
        if status != 0:
            raise RuntimeError(f"NVML {what} failed with status {status}")

    def _read(self, fn, ctype, *args):
        value = ctype()
        self._ok(fn(self.handle, *args, ctypes.byref(value)), fn.__name__)
        return value.value

    def energy_j(self):
        return self._read(self.lib.nvmlDeviceGetTotalEnergyConsumption, ctypes.c_ulonglong) / 1e3

    def power_w(self):
        return self._read(self.lib.nvmlDeviceGetPowerUsage, ctypes.c_uint) / 1e3

    def sm_mhz(self):
        return self._read(self.lib.nvmlDeviceGetClockInfo, ctypes.c_uint, 1)  # NVML_CLOCK_SM

    def temp_c(self):
        return self._read(self.lib.nvmlDeviceGetTemperature, ctypes.c_uint, 0)  # NVML_TEMPERATURE_GPU

    def reasons(self):
        return self._read(self._reasons, ctypes.c_ulonglong)

    def limit_w(self):
        return self._read(self.lib.nvmlDeviceGetEnforcedPowerLimit, ctypes.c_uint) / 1e3


def sustain(nvml: Nvml, replay, per_replay: int, label: str) -> dict:
    """Replay for HOLD_S after WARM_S; ms and joules per call (per_replay calls per replay)."""
    def loop(seconds):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = 0
        while time.perf_counter() - t0 < seconds:
            for _ in range(4):
                replay()
            n += 4
            torch.cuda.synchronize()
        return n, time.perf_counter() - t0
    n_warm, s_warm = loop(WARM_S)
    n = max(8, int(n_warm * HOLD_S / s_warm))
    samples, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            samples.append((nvml.power_w(), nvml.sm_mhz(), nvml.reasons()))
            time.sleep(0.02)
    watcher = threading.Thread(target=sample)
    torch.cuda.synchronize()
    e0 = nvml.energy_j()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    watcher.start()
    t0 = time.perf_counter()
    start.record()
    for _ in range(n):
        replay()
    end.record()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    e1 = nvml.energy_j()  # (the counter moves every ~100 ms: about +-5% on a 2-s hold)
    stop.set()
    watcher.join()
    calls = n * per_replay
    reasons = 0
    for _, _, r in samples:
        reasons |= r
    row = {"label": label, "ms": start.elapsed_time(end) / calls, "j": (e1 - e0) / calls,
           "w": (e1 - e0) / wall, "w_samples": statistics.median(p for p, _, _ in samples) if samples else 0.0,
           "mhz": statistics.median(c for _, c, _ in samples) if samples else 0, "reasons": hex(reasons),
           "temp": nvml.temp_c()}
    print(f"  {label:46s} {row['ms']:9.4f} ms {row['j'] * 1e3:9.3f} mJ {row['w']:6.0f} W "
          f"(samples {row['w_samples']:.0f}) {row['mhz']:5.0f} MHz reasons {row['reasons']} {row['temp']} C",
          flush=True)
    return row


def measured_engine(spec: str):
    """(model, engine, batch) for MODEL:BATCH[:DTYPE], its plan measured from an empty cache."""
    name, batch, *dt = spec.split(":")
    target = detect("cuda")
    model = wu.seeded_engine(vit_config(name, "ait"), getattr(torch, dt[0] if dt else "float16"), target.device)
    with tempfile.TemporaryDirectory() as cache:
        engine = cp.compile_engine(model, int(batch), target, cp.Options(), cache_root=cache, log=print)
    return model, engine, int(batch)


def forward(nvml, specs):
    target = detect("cuda")
    for spec in specs:
        print(f"{spec}: power limit {nvml.limit_w():.0f} W", flush=True)
        model, engine, batch = measured_engine(spec)
        cfg, dtype = model.cfg, model.patch_embed.weight.dtype
        row = sustain(nvml, engine.run, 1, f"engine {engine.plan}"[:46])
        print(f"  engine: {batch / row['ms'] * 1e3:.0f} im/s, {batch / row['j']:.1f} images per joule", flush=True)
        del engine, model
        timm_model = wu.source_model(cfg)[0].to(target.device, dtype)
        images = torch.randn(batch, cfg.in_chans, *cfg.img_size, device=target.device, dtype=dtype)
        with torch.inference_mode():
            row = sustain(nvml, lambda: timm_model(images), 1, "TIMM eager")
        print(f"  eager: {batch / row['ms'] * 1e3:.0f} im/s, {batch / row['j']:.1f} images per joule", flush=True)
        timm_model = None  # free it before the next spec
        torch.cuda.empty_cache()


def site_calls(model, batch, plan, site, names, inputs=None):
    """{name: callable} for one plan site, on block 0's weights and random inputs of the real shapes,
    or on `inputs` (block_inputs: what a forward feeds that block's sites)."""
    cfg, dev = model.cfg, model.patch_embed.weight.device
    dtype = model.patch_embed.weight.dtype
    rows, blk = batch * cfg.seq_len, model.blocks[0]
    gen = torch.Generator(device=dev).manual_seed(0)

    def rand(cols):
        return torch.randn(rows, cols, device=dev, dtype=dtype, generator=gen)
    if inputs is None:
        x, a, h, qkv = rand(cfg.embed_dim), rand(cfg.embed_dim), rand(cfg.mlp_hidden), rand(3 * cfg.embed_dim)
        n1 = n2 = x
    else:
        blk = model.blocks[inputs["block"]]
        x, n1, qkv, a, n2, h = (inputs[k].clone() for k in ("x", "n1", "qkv", "a", "n2", "h"))
    attn_out = rand(cfg.embed_dim)  # one output buffer: the CUDA attention kernel's descriptors are per address
    n = blk.norm1

    def call(name):
        impl, _, tile = name.partition(":")
        if site == "qkv":
            return lambda: ops.linear(n1, blk.qkv.weight, blk.qkv.bias, "" if name == "cublas" else name)
        if site in ("proj", "fc2"):
            src, weight = (a, blk.proj.weight) if site == "proj" else (h, blk.fc2.weight)
            return lambda: ops.residual_linear(x, src, weight, plan.residual, "" if name == "cublas" else name)
        if site == "mlp_act":
            return lambda: ops.linear_gelu(n2, blk.fc1.weight, blk.fc1.bias, cfg.act, impl, tile)
        if site == "norm":
            return lambda: ops.layer_norm(x, n.weight, n.bias, n.eps, n.shift, impl, tile=tile)
        if site == "attention":
            def run():
                with ops.sdpa_backend(impl):
                    return ops.attention(qkv, batch, cfg.num_heads, cfg.head_dim, impl, tile, out=attn_out)
            return run
        raise KeyError(site)
    return {name: call(name) for name in names}


@torch.no_grad()
def block_inputs(model, plan, images, block: int) -> dict:
    """What a forward with `plan` feeds block `block`'s sites: the residual stream x, norm1's output
    n1, qkv, the attention's output a, norm2's output n2 and fc1's GELU output h."""
    cfg, batch = model.cfg, images.shape[0]
    model.set_plan(plan)
    with ops.sdpa_backend(plan.attention):
        x = model.embed(images).clone()
        for blk in model.blocks[:block]:
            x = blk(x, batch, plan)
        blk = model.blocks[block]
        n1 = blk.norm1(x, plan).clone()
        qkv = blk.qkv(n1, plan).clone()
        a = ops.attention(qkv, batch, cfg.num_heads, cfg.head_dim, plan.attention, plan.attention_tile).clone()
        x_in = x.clone()
        x = blk.proj(a, plan, residual=x)
        n2 = blk.norm2(x, plan).clone()
        h = blk.fc1(n2, plan).clone()
    return {"block": block, "x": x_in, "n1": n1, "qkv": qkv, "a": a, "n2": n2, "h": h}


def sustain_site(nvml, model, batch, plan, site, names, times, inputs=None, tag="") -> dict:
    """{name: sustained row} for each candidate `name` of one site, alone in a graph of ~10 ms."""
    rows = {}
    for label, fn in site_calls(model, batch, plan, site, names, inputs).items():
        try:
            fn()
            ms = times.get(label) or (min(times.values()) if times else 1.0)
            per_replay = max(1, int(10.0 / max(ms, 1e-3)))  # ~10 ms per replay
            graph, _ = cp.capture_graph(lambda: [fn() for _ in range(per_replay)])
        except (RuntimeError, ValueError) as err:
            print(f"  {label}: does not run ({str(err)[:60]})")
            continue
        rows[label] = sustain(nvml, graph.replay, per_replay, f"{tag}{label} ({times.get(label, 0):.4f})")
        del graph
    return rows


def alone(nvml, spec, site, names, rounds=2):
    """Named candidates of one site (e.g. norm triton triton:r2w4), alone and sustained, in alternation."""
    model, engine, batch = measured_engine(spec)
    plan, times = engine.plan, dict(engine.info["measured"].get(site) or {})
    print(f"{spec}: plan {plan}; {site} candidates {names}", flush=True)
    del engine
    with torch.no_grad():
        for r in range(rounds):
            print(f"round {r}", flush=True)
            sustain_site(nvml, model, batch, plan, site, names, times)


def sites(nvml, spec, close, only=None):
    model, engine, batch = measured_engine(spec)
    plan, report = engine.plan, engine.info["measured"]
    print(f"{spec}: plan {plan}; power limit {nvml.limit_w():.0f} W", flush=True)
    whole = sustain(nvml, engine.run, 1, "whole forward")
    del engine
    chosen = {"qkv": plan.qkv_tile or "cublas", "proj": plan.proj_tile or "cublas", "fc2": plan.fc2_tile or "cublas",
              "mlp_act": f"{plan.mlp_act}:{plan.fc1_tile}".rstrip(":"),
              "attention": f"{plan.attention}:{plan.attention_tile}".rstrip(":"),
              "norm": f"{plan.norm}:{plan.norm_tile}".rstrip(":")}
    per_block_j = {}
    with torch.no_grad():
        for site in only or ("mlp_act", "qkv", "fc2", "proj", "attention", "norm"):
            times = report.get(site) or {}
            if not times:
                continue
            best = min(times.values())
            names = [k for k in sorted(times, key=times.get) if times[k] <= best * (1 + close)]
            if chosen[site] not in names:
                names.append(chosen[site])
            print(f"{site}: chosen {chosen[site]}; {len(names)} candidates within {close:.0%} (the plan's ms: "
                  "sustained for its finalists from engine 13, short for the others)",
                  flush=True)
            for label, row in sustain_site(nvml, model, batch, plan, site, names, times).items():
                if label == chosen[site]:
                    per_block_j[site] = row["j"]
    depth = model.cfg.depth
    sum_j = depth * (sum(j for s, j in per_block_j.items() if s != "norm") + 2 * per_block_j.get("norm", 0))
    print(f"whole forward {whole['j']:.3f} J; the chosen kernels alone, summed over {depth} blocks: {sum_j:.3f} J",
          flush=True)


def data(nvml, spec, site, names, rounds=2, block=5):
    """Named candidates of one site, alone and sustained, on random inputs and on what a forward
    feeds block `block`, alternating: do the isolated timings rank them as the whole forward does?"""
    model, engine, batch = measured_engine(spec)
    plan, times = engine.plan, dict(engine.info["measured"].get(site) or {})
    real = block_inputs(model, plan, engine._static_in, block)
    print(f"{spec}: plan {plan}; {site} candidates {names}; real inputs from block {block}", flush=True)
    del engine
    rows = {}
    with torch.no_grad():
        for r in range(rounds):
            for tag, inputs in (("randn ", None), ("real ", real)):
                for label, row in sustain_site(nvml, model, batch, plan, site, names, times, inputs, tag).items():
                    rows.setdefault(tag + label, []).append(row)
    for label, got in rows.items():
        print(f"{label:40s} {statistics.median(r['ms'] for r in got):9.4f} ms "
              f"{statistics.median(r['j'] for r in got) * 1e3:8.2f} mJ", flush=True)


def swaps(nvml, spec, labels, rounds=3):
    model, engine, batch = measured_engine(spec)
    target = engine.target
    plans = {"chosen": engine.plan}
    for label in labels:
        site, _, choice = label.partition("=")
        plans[label] = cp.with_choice(engine.plan, site, choice)
        if plans[label] == engine.plan:
            print(f"note: {label} is the measured plan's own choice", flush=True)
    print(f"{spec}: plan {engine.plan}", flush=True)
    del engine
    sustain_plans(nvml, model, batch, target, plans, rounds)


def sustain_plans(nvml, model, batch, target, plans: dict, rounds: int):
    """Each plan's whole forward captured in its own graph on one arena, then sustain_rounds against
    the first."""
    images = torch.randn(batch, model.cfg.in_chans, *model.cfg.img_size, device=target.device, dtype=torch.float16)
    arena = cp.ActivationArena(model.cfg, batch, torch.float16, target.device)
    graphs = {}
    with torch.no_grad():
        for label, plan in plans.items():
            model.set_plan(plan)
            graphs[label], _ = cp.capture_graph(lambda: model(images, arena))
    sustain_rounds(nvml, graphs, next(iter(graphs)), rounds, batch)


def plan_from(path: str, batch: int) -> ops.Plan:
    """The plan in a plan cache entry (plan.json), or in a results JSON's last row for `batch`."""
    entry = json.load(open(path))
    if "plan" in entry:
        return ops.Plan(**entry["plan"])
    rows = [r for r in entry["rows"] if r["batch_size"] == batch]
    if not rows:
        sys.exit(f"error: {path} has no row for batch {batch}")
    return ops.Plan(**rows[-1]["plan"])


def plans(nvml, spec, files, rounds=3):
    """Whole plans against each other on one machine: do the plans that different runs chose differ
    in time, beside the run-to-run spread of the machines? ("compile": a plan measured now.)"""
    name, batch = spec.split(":")[:2]
    batch, target = int(batch), detect("cuda")
    model = wu.seeded_engine(vit_config(name, "ait"), torch.float16, target.device)
    chosen = {}
    for i, path in enumerate(files):
        if path == "compile":
            with tempfile.TemporaryDirectory() as cache:
                engine = cp.compile_engine(model, batch, target, cp.Options(), cache_root=cache, log=print)
            plan, label, report = engine.plan, f"{path}#{i}", engine.info["measured"]
            print(f"{label}: compile_s {engine.info['compile_s']}, phases {report['phases_s']}", flush=True)
            for site in ("qkv", "proj", "fc2", "mlp_act", "attention"):
                times = report.get(site) or {}
                print(f"  {site}: " + " ".join(f"{k}={v * 1e3:.1f}" for k, v in sorted(times.items(), key=lambda kv: kv[1])[:6]),
                      flush=True)
            del engine
        else:
            plan, label = plan_from(path, batch), path
        same = [other for other, p in chosen.items() if p == plan]
        print(f"{label}: {json.dumps({k: v for k, v in plan.as_dict().items() if v})}"
              + (f" (the same as {same[0]})" if same else ""), flush=True)
        if not same:
            chosen[label] = plan
    sustain_plans(nvml, model, batch, target, chosen, rounds)


def sustain_rounds(nvml, graphs: dict, base: str, rounds: int, batch: int):
    """Whole-forward graphs sustained in alternation, `rounds` times; medians against graphs[base]."""
    rows = {label: [] for label in graphs}
    for r in range(rounds):
        for label, graph in graphs.items():
            rows[label].append(sustain(nvml, graph.replay, 1, f"round {r} {label}"))
    base_ms = statistics.median(row["ms"] for row in rows[base])
    for label, got in rows.items():
        ms = statistics.median(row["ms"] for row in got)
        j = statistics.median(row["j"] for row in got)
        print(f"{label:46s} {ms:8.3f} ms ({ms / base_ms:.3f} of {base}) {j:7.3f} J {batch / ms * 1e3:7.0f} im/s",
              flush=True)


def whatif_forwards(spec: str, rounds: int, variants):
    """The what-if probes' run: MODEL:BATCH's measured plan as whole forwards, one graph per variant,
    sustained in alternation (sustain_rounds). `variants(model, plan, images, arena)` returns
    {label: context manager factory}, "plan" first (nothing changed); each variant is captured inside
    its context. The returned dict is held until the timings end (what the graphs launch may live in
    it). A variant that does not capture is reported and left out; the others' logits are compared
    with the plan's."""
    nvml = Nvml(torch.cuda.current_device())
    model, engine, batch = measured_engine(spec)
    plan, images = engine.plan, engine._static_in
    print(f"{spec}: plan {plan}", flush=True)
    model.set_plan(plan)
    arena = cp.ActivationArena(model.cfg, batch, images.dtype, images.device)
    del engine
    chosen, graphs, reference = variants(model, plan, images, arena), {}, None
    with torch.no_grad():
        for label, patched in chosen.items():
            try:
                with patched():
                    graphs[label], out = cp.capture_graph(lambda: model(images, arena))
            except Exception as error:  # noqa: BLE001 - a probe: report and go on
                print(f"{label}: not captured ({type(error).__name__}: {error})", flush=True)
                continue
            graphs[label].replay()
            torch.cuda.synchronize()
            reference = out.float().clone() if reference is None else reference
            err = ((out.float() - reference).abs().max() / reference.abs().max()).item()
            print(f"{label}: logits finite {bool(torch.isfinite(out).all())}, max |logits - plan's| / max |plan's| "
                  f"= {err:.2e}", flush=True)
    sustain_rounds(nvml, graphs, "plan", rounds, batch)


def whatif_cli(main, doc: str):
    """The command line of the what-if probes (norm_whatif, chunk_whatif, attention_whatif): MODEL:BATCH [ROUNDS]."""
    if len(sys.argv) < 2:
        sys.exit(doc)
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)


def ramp(nvml):
    """From idle into a sustained GEMM load: how fast the clock meets the cap, and how often the
    energy counter moves (can short windows be measured in energy?)."""
    x = torch.randn(50176, 768, device="cuda", dtype=torch.float16)
    w = torch.randn(2304, 768, device="cuda", dtype=torch.float16)
    graph, _ = cp.capture_graph(lambda: [x @ w.t() for _ in range(10)])
    time.sleep(2.0)
    samples, stop = [], threading.Event()

    def sample():
        t0 = time.perf_counter()
        while not stop.is_set():
            samples.append((time.perf_counter() - t0, nvml.energy_j(), nvml.sm_mhz(), nvml.power_w()))
            time.sleep(0.001)
    watcher = threading.Thread(target=sample)
    watcher.start()
    time.sleep(0.05)
    for _ in range(400):  # about 1.2 s of GEMMs
        graph.replay()
    torch.cuda.synchronize()
    time.sleep(0.05)
    stop.set()
    watcher.join()
    changes = [i for i in range(1, len(samples)) if samples[i][1] != samples[i - 1][1]]
    gaps = [samples[b][0] - samples[a][0] for a, b in zip(changes, changes[1:])]
    print(f"ramp: {len(samples)} samples over {samples[-1][0]:.2f} s; the energy counter changed {len(changes)} "
          f"times, median gap {statistics.median(gaps) * 1e3 if gaps else float('nan'):.1f} ms", flush=True)
    last = -1.0
    for t, e, mhz, w in samples:
        if t - last >= 0.025:
            print(f"  t {t * 1e3:7.1f} ms  energy {e:12.3f} J  {mhz:5d} MHz  {w:6.1f} W")
            last = t


def main(argv):
    if not argv or argv[0] not in ("forward", "sites", "alone", "data", "swaps", "plans", "ramp") or (argv[0] != "ramp" and len(argv) < 2) \
            or (argv[0] in ("alone", "data") and len(argv) < 4):
        sys.exit(__doc__)
    nvml = Nvml(torch.cuda.current_device())
    if argv[0] == "forward":
        forward(nvml, argv[1:])
    elif argv[0] == "sites":
        sites(nvml, argv[1], float(argv[2]) if len(argv) > 2 else 0.08, argv[3].split(",") if len(argv) > 3 else None)
    elif argv[0] == "alone":
        alone(nvml, argv[1], argv[2], argv[3:])
    elif argv[0] == "data":
        data(nvml, argv[1], argv[2], argv[3:])
    elif argv[0] == "swaps":
        swaps(nvml, argv[1], argv[2:])
    elif argv[0] == "plans":
        plans(nvml, argv[1], argv[2:])
    else:
        ramp(nvml)


if __name__ == "__main__":
    main(sys.argv[1:])
