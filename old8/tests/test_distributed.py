"""Data-parallel runs: torchrun's variables, splitting the global batch, the aggregated row, the
results lines; then the real thing on the CPU (gloo, 2 processes, the tiny ViT) for both
benchmarks and for benchmark_mi250.sh."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine import EngineError
from engine import distributed
from engine.distributed import Group, from_env
from engine.results import record
from engine.sweep import aggregate
from engine.target import Target

ROOT = Path(__file__).resolve().parent.parent
MODEL = "vit_micro_patch8_32"
NUMBER = r"[0-9]+\.[0-9]+"


# --- units -----------------------------------------------------------------------------------

def test_no_torchrun_variables_is_one_process():
    g = from_env({})
    assert (g.rank, g.world_size, g.enabled, g.is_main) == (0, 1, False, True)
    assert g.global_sizes(0, [1, 2, 4]) == [1, 2, 4] and g.global_sizes(3, [1]) == [3]
    assert g.all_ok(True) and not g.all_ok(False) and g.agree(17) == 17
    assert g.all_gather_object({"a": 1}) == [{"a": 1}]


def test_torchrun_variables():
    g = from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (g.rank, g.world_size, g.local_rank, g.local_world_size) == (3, 4, 1, 2)
    assert g.enabled and not g.is_main
    with pytest.raises(EngineError, match="WORLD_SIZE='two'"):
        from_env({"RANK": "0", "WORLD_SIZE": "two"})
    with pytest.raises(EngineError, match="inconsistent"):
        from_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_global_batch_must_split_evenly(monkeypatch):
    monkeypatch.setattr(distributed, "REFUSE_GRACE_S", 0)
    main, other = Group(rank=0, world_size=2), Group(rank=1, world_size=2)
    assert main.global_sizes(8, []) == [8] and main.local_batch(8) == 4
    assert main.global_sizes(0, [1, 2, 4, 8]) == [2, 4, 8]  # the sweep keeps the sizes that split
    with pytest.raises(EngineError, match=r"--batch-size 3 is the global batch .* 2 devices"):
        main.global_sizes(3, [])
    with pytest.raises(SystemExit):  # the other ranks leave without repeating the message
        other.global_sizes(3, [])


def test_more_processes_than_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    rocm = Target("rocm", torch.device("cuda", 0), "MI250")
    with pytest.raises(EngineError, match="2 processes per node but 1 GPU"):
        Group(rank=0, world_size=2, local_world_size=2).init(rocm)


class _Cfg:
    def flops(self, batch):
        return 1e9 * batch


def _rank_row(rank, latency, batch=8, world=2):
    row = {"batch_size": batch, "mode": "ait", "engine": "ait", "devices": world, "model": MODEL, "variant": "ait",
           "rank": rank, "local_batch_size": batch // world, "environment": {"gpu": f"gpu{rank}", "host": "h"},
           "gflop": 4.0, "plan": {"norm": "torch"}}
    if latency == "OOM":
        row.update(latency_ms="OOM", qps=None)
    else:
        row.update(latency_ms=latency, qps=(batch // world) * 1e3 / latency, peak_mem_mb=10.0 + rank,
                   timing={"median_ms": latency})
    return row


def test_aggregate_takes_the_slowest_rank():
    s = aggregate([_rank_row(0, 2.0), _rank_row(1, 4.0)], _Cfg())
    assert s["batch_size"] == 8 and s["devices"] == 2 and s["local_batch_size"] == 4 and "rank" not in s
    assert s["latency_ms"] == 4.0 and s["slowest_rank"] == 1 and s["rank_latency_ms"] == [2.0, 4.0]
    assert s["qps"] == pytest.approx(8 * 1e3 / 4.0)
    assert s["peak_mem_mb"] == 11.0 and s["gflop"] == 8.0 and s["plan"] == {"norm": "torch"}
    assert s["environment"]["rank_gpus"] == ["gpu0", "gpu1"]
    oom = aggregate([_rank_row(0, 2.0), _rank_row(1, "OOM")], _Cfg())
    assert oom["latency_ms"] == "OOM" and oom["qps"] is None and oom["oom_ranks"] == [1]


def test_results_lines_of_a_data_parallel_run(tmp_path):
    rows = [_rank_row(0, 2.0), _rank_row(1, 4.0)]
    for r in [aggregate(rows, _Cfg())] + rows:
        record(tmp_path, "stem", r)
    record(tmp_path, "stem", {"batch_size": 8, "mode": "ait", "devices": 1, "latency_ms": 3.0, "qps": 2666.7})
    oom_rows = [_rank_row(0, 2.0, batch=16), _rank_row(1, "OOM", batch=16)]
    record(tmp_path, "stem", aggregate(oom_rows, _Cfg()))
    assert (tmp_path / "stem.txt").read_text().splitlines() == [
        "batch_size: 8, latency: 4.0000, devices: 2, qps: 2000.00",
        "batch_size: 8, latency: 2.0000, devices: 2, qps: 2000.00, rank: 0, local_batch_size: 4",
        "batch_size: 8, latency: 4.0000, devices: 2, qps: 1000.00, rank: 1, local_batch_size: 4",
        "batch_size: 8, latency: 3.0000",
        "batch_size: 16, latency: OOM, devices: 2, qps: OOM",
    ]
    saved = json.loads((tmp_path / "stem.json").read_text())["rows"]
    assert sorted((r["devices"], r["batch_size"], r.get("rank", -1)) for r in saved) == [
        (1, 8, -1), (2, 8, -1), (2, 8, 0), (2, 8, 1), (2, 16, -1)]


# --- 2 processes on the CPU --------------------------------------------------------------------

def _env(**extra):
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(OMP_NUM_THREADS="1", TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    for var in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    env.update(extra)
    return env


def _run(args, timeout=180, **env):
    return subprocess.run(args, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=timeout)


def _torchrun(script, *args):
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                 script, "--model-name", MODEL, "--time-budget", "0.05", *args])


def _check_run(out_dir, stem, batch, engine_mode):
    lines = (out_dir / f"{stem}.txt").read_text().splitlines()
    assert len(lines) == 3, lines
    assert re.fullmatch(rf"batch_size: {batch}, latency: {NUMBER}, devices: 2, qps: {NUMBER}", lines[0])
    for rank, line in enumerate(sorted(lines[1:], key=lambda s: s.split("rank: ")[1])):
        assert re.fullmatch(rf"batch_size: {batch}, latency: {NUMBER}, devices: 2, qps: {NUMBER}, "
                            rf"rank: {rank}, local_batch_size: {batch // 2}", line)
    rows = json.loads((out_dir / f"{stem}.json").read_text())["rows"]
    summary = [r for r in rows if r.get("rank") is None]
    per_rank = sorted((r for r in rows if r.get("rank") is not None), key=lambda r: r["rank"])
    assert len(summary) == 1 and [r["rank"] for r in per_rank] == [0, 1]
    s = summary[0]
    assert (s["batch_size"], s["devices"], s["local_batch_size"], s["mode"]) == (batch, 2, batch // 2, engine_mode)
    assert s["latency_ms"] == max(r["latency_ms"] for r in per_rank)
    assert s["qps"] == pytest.approx(batch * 1e3 / s["latency_ms"])
    assert s["rank_latency_ms"] == [r["latency_ms"] for r in per_rank]
    assert s["environment"]["target"] == "cpu"
    for r in per_rank:
        assert (r["batch_size"], r["devices"], r["local_batch_size"]) == (batch, 2, batch // 2)
        assert r["qps"] == pytest.approx((batch // 2) * 1e3 / r["latency_ms"])
    # both ranks timed the same number of iterations (rank 0 decided)
    assert per_rank[0]["timing"]["iters"] == per_rank[1]["timing"]["iters"]


def test_torchrun_benchmark_ait(tmp_path):
    p = _torchrun("benchmark_ait.py", "--batch-size", "4", "--output-dir", str(tmp_path),
                  "--cache-dir", str(tmp_path / "cache"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ait ait batch 4 on 2 devices:" in p.stderr
    assert p.stdout.count("results:") == 1  # rank 0 reports, once
    _check_run(tmp_path, f"{MODEL}_ait_benchmark_dev_-1", 4, "ait")


def test_torchrun_benchmark_pt(tmp_path):
    p = _torchrun("benchmark_pt.py", "--batch-size", "2", "--output-dir", str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    _check_run(tmp_path, f"{MODEL}_pt_benchmark_dev_-1", 2, "eager")


def test_torchrun_refuses_a_batch_that_does_not_split(tmp_path):
    p = _torchrun("benchmark_pt.py", "--batch-size", "3", "--output-dir", str(tmp_path))
    assert p.returncode != 0
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --batch-size 3 is the global batch and must split evenly over 2 devices "
                      "(use a multiple of 2)"]
    assert not list(tmp_path.glob("*.txt"))


# --- benchmark_mi250.sh ------------------------------------------------------------------------

SCRIPT = str(ROOT / "benchmark_mi250.sh")


def test_mi250_script_is_executable_and_keeps_nvls_off():
    assert os.access(SCRIPT, os.X_OK)
    text = Path(SCRIPT).read_text()
    assert "export NCCL_NVLS_ENABLE=0" in text
    assert "HIP_VISIBLE_DEVICES" in text and "CUDA_VISIBLE_DEVICES" in text and "torch.version.hip" in text


@pytest.mark.parametrize("args,message", [
    ([], "expected one argument"),
    (["3"], "N must be even"),
    (["7"], "N must be even"),
    (["0"], "at least 2"),
    (["four"], "must be a positive integer"),
    (["2.5"], "must be a positive integer"),
    (["2", "4"], "expected one argument"),
])
def test_mi250_script_refuses_bad_n(args, message, tmp_path):
    p = _run([SCRIPT, *args], timeout=30, OUTPUT_DIR=str(tmp_path))
    assert p.returncode != 0
    assert message in p.stderr and "usage:" in p.stderr
    assert not list(tmp_path.iterdir())  # refused before any work


def test_mi250_script_on_the_cpu(tmp_path):
    p = _run([SCRIPT, "2"], timeout=300, MODEL_NAME=MODEL, OUTPUT_DIR=str(tmp_path),
             BENCH_ARGS=f"--time-budget 0.05 --cache-dir {tmp_path / 'cache'}")
    assert p.returncode == 0, p.stderr[-3000:]
    table = [line for line in p.stdout.splitlines() if line.startswith("devices:")]
    assert len(table) == 2, p.stdout
    assert re.match(rf"devices: 1, batch_size: 2, per_device_batch: 2, latency: {NUMBER} ms, qps: {NUMBER}", table[0])
    assert re.match(rf"devices: 2, batch_size: 2, per_device_batch: 1, latency: {NUMBER} ms, qps: {NUMBER}", table[1])
    assert "gloo" in p.stderr
    lines = (tmp_path / f"{MODEL}_ait_benchmark_dev_-1.txt").read_text().splitlines()
    # the compile sweep (1, 2, 4), the 1-device run at 2 (single-process lines as before), then 2 devices
    assert [line.split(",")[0] for line in lines[:4]] == ["batch_size: 1", "batch_size: 2", "batch_size: 4",
                                                          "batch_size: 2"]
    assert all(re.fullmatch(rf"batch_size: \d+, latency: {NUMBER}", line) for line in lines[:4])
    assert re.fullmatch(rf"batch_size: 2, latency: {NUMBER}, devices: 2, qps: {NUMBER}", lines[4])
    assert len(lines) == 7 and all("rank:" in line for line in lines[5:])


def test_out_of_memory_on_one_rank_keeps_the_others_in_step(tmp_path):
    p = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
              "tests/dp_oom_worker.py", str(tmp_path)], timeout=120, PYTHONPATH=str(ROOT))
    assert p.returncode == 0, p.stderr[-3000:]
    done = sorted((json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")),
                  key=lambda d: d["rank"])
    assert done == [{"rank": 0, "complete": False}, {"rank": 1, "complete": False}]
    rows = json.loads((tmp_path / "stem.json").read_text())["rows"]
    summary = {r["batch_size"]: r for r in rows if r.get("rank") is None}
    assert {b: summary[b]["latency_ms"] == "OOM" for b in summary} == {2: True, 4: True, 6: True, 8: False}
    assert all(summary[b]["oom_ranks"] == [1] for b in (2, 4, 6))
    per_rank = {(r["batch_size"], r["rank"]): r["latency_ms"] for r in rows if r.get("rank") is not None}
    assert per_rank[(2, 0)] == per_rank[(4, 0)] == "OOM"   # rank 0 could not time without its peer
    assert isinstance(per_rank[(6, 0)], float)              # rank 1 failed after the timed loop began
    assert per_rank[(6, 1)] == "OOM" and isinstance(per_rank[(8, 1)], float)
    assert "out of GPU memory on another rank" in p.stderr


@pytest.mark.parametrize("hip,var", [("6.2.41133", "HIP_VISIBLE_DEVICES"), ("-", "CUDA_VISIBLE_DEVICES")])
def test_mi250_script_on_gpus_selects_devices_per_vendor(tmp_path, hip, var):
    """The GPU branch, with a stand-in interpreter that reports `hip` and 2 GPUs and logs each call."""
    log = tmp_path / "calls.jsonl"
    fake = tmp_path / "fake_python"
    fake.write_text(f"""#!{sys.executable}
import json, os, sys
if sys.argv[1] == "-c":
    print("{hip} 2")
    sys.exit(0)
with open({str(log)!r}, "a") as f:
    f.write(json.dumps({{"args": sys.argv[1:], "env": {{k: os.environ.get(k) for k in
            ("HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "NCCL_NVLS_ENABLE")}}}}) + "\\n")
""")
    fake.chmod(0o755)
    p = _run([SCRIPT, "8"], timeout=30, PYTHON=str(fake), MODEL_NAME="vit_base_patch16_224", OUTPUT_DIR="out",
             BENCH_ARGS="--use-graph True")
    assert p.returncode == 0, p.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 4
    other = "CUDA_VISIBLE_DEVICES" if var == "HIP_VISIBLE_DEVICES" else "HIP_VISIBLE_DEVICES"
    assert [c["env"][var] for c in calls[:3]] == ["0", "0", "0,1"]
    assert all(c["env"][other] is None and c["env"]["NCCL_NVLS_ENABLE"] == "0" for c in calls)
    bench = ["benchmark_ait.py", "--model-name", "vit_base_patch16_224", "--output-dir", "out", "--use-graph", "True"]
    assert calls[0]["args"] == bench                                # compile every batch size
    assert calls[1]["args"] == bench + ["--batch-size", "8"]        # one device
    assert calls[2]["args"] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                                *bench, "--batch-size", "8"]        # two devices, 4 each
    assert calls[3]["args"] == ["-m", "engine.device_table", "--batch-size", "8", "--mode", "ait", "--devices", "1,2",
                                "out/vit_base_patch16_224_ait_benchmark_dev_0.json",
                                "out/vit_base_patch16_224_ait_benchmark_dev_0_1.json"]


def test_device_table_takes_the_newest_whole_run_rows(tmp_path):
    from click.testing import CliRunner
    from engine.device_table import main as table
    rows = [
        {"batch_size": 8, "mode": "ait", "devices": 1, "latency_ms": 4.0, "qps": 2000.0,
         "environment": {"date": "2025-01-01T00:00:00", "gpu": "old"}},
        {"batch_size": 8, "mode": "ait", "devices": 1, "latency_ms": 2.0, "qps": 4000.0,
         "environment": {"date": "2025-02-01T00:00:00", "gpu": "g"}},
        {"batch_size": 8, "mode": "ait", "devices": 2, "rank": 0, "local_batch_size": 4, "latency_ms": 1.0,
         "qps": 4000.0, "environment": {"date": "2025-02-01T00:00:00", "gpu": "g"}},
        {"batch_size": 8, "mode": "ait", "devices": 2, "local_batch_size": 4, "latency_ms": 1.25, "qps": 6400.0,
         "rank_latency_ms": [1.0, 1.25], "environment": {"date": "2025-02-01T00:00:00", "gpu": "g"}},
        {"batch_size": 4, "mode": "ait", "devices": 2, "latency_ms": 1.0, "qps": 4000.0, "environment": {}},
    ]
    (tmp_path / "r.json").write_text(json.dumps({"rows": rows}))
    out = CliRunner().invoke(table, ["--batch-size", "8", str(tmp_path / "r.json")])
    assert out.exit_code == 0, out.output
    lines = [line for line in out.output.splitlines() if line.startswith("devices:")]
    assert lines[0].startswith("devices: 1, batch_size: 8, per_device_batch: 8, latency: 2.0000 ms, qps: 4000.00, "
                               "speed-up: 1.00x")
    assert lines[1].startswith("devices: 2, batch_size: 8, per_device_batch: 4, latency: 1.2500 ms, qps: 6400.00, "
                               "speed-up: 1.60x, rank latencies: 1.0000 / 1.2500")
    missing = CliRunner().invoke(table, ["--batch-size", "2", str(tmp_path / "r.json")])
    assert missing.exit_code == 1


def test_shared_gpu_uses_gloo_for_the_collectives(monkeypatch):
    from engine import distributed
    from engine.target import Target
    import torch
    gpu = Target("cuda", torch.device("cuda", 0), "some GPU")
    monkeypatch.delenv(distributed.SHARE_GPU_ENV, raising=False)
    assert distributed.backend_for(gpu) == "nccl"
    monkeypatch.setenv(distributed.SHARE_GPU_ENV, "1")
    assert distributed.backend_for(gpu) == "gloo"
