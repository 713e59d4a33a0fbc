"""The 1-device vs several-devices table benchmark_mi250.sh ends with, read from the JSON
results of benchmark_ait.py runs (the newest row of each device count at one global batch).

    python3 -m engine.device_table --batch-size N [--mode ait] [--devices 1,2] RESULTS.json...
"""
from __future__ import annotations

import sys
from typing import Dict, Iterable, List

import click

from .results import read_json_rows


def pick_rows(paths: Iterable, batch: int, mode: str, devices: List[int]) -> Dict[int, dict]:
    """{devices: newest whole-run row (not a per-rank one) at global batch `batch`}."""
    best: Dict[int, dict] = {}
    for path in dict.fromkeys(str(p) for p in paths):  # each file once
        for row in read_json_rows(path):
            n = row.get("devices", 1)
            if row.get("batch_size") != batch or row.get("mode") != mode or row.get("rank") is not None:
                continue
            if n not in devices:
                continue
            date = row.get("environment", {}).get("date", "")
            if n not in best or date >= best[n].get("environment", {}).get("date", ""):
                best[n] = row
    return best


def format_table(rows: Dict[int, dict], batch: int, devices: List[int]) -> List[str]:
    base = rows.get(devices[0])
    base_qps = base.get("qps") if base else None
    lines = []
    for n in devices:
        row = rows.get(n)
        if row is None:
            lines.append(f"devices: {n}, batch_size: {batch}: no result")
            continue
        env = row.get("environment", {})
        per_device = row.get("local_batch_size", batch // n)
        latency, qps = row.get("latency_ms"), row.get("qps")
        if isinstance(latency, str) or qps is None:
            lines.append(f"devices: {n}, batch_size: {batch}, per_device_batch: {per_device}, latency: {latency}")
            continue
        line = (f"devices: {n}, batch_size: {batch}, per_device_batch: {per_device}, latency: {latency:.4f} ms, "
                f"qps: {qps:.2f}")
        if base_qps:
            line += f", speed-up: {qps / base_qps:.2f}x"
        if row.get("rank_latency_ms"):
            line += ", rank latencies: " + " / ".join(f"{t:.4f}" for t in row["rank_latency_ms"])
        line += f"  [{env.get('gpu')}, {env.get('dtype')}]"
        lines.append(line)
    return lines


@click.command()
@click.option("--batch-size", type=click.IntRange(min=1), required=True, help="the global batch")
@click.option("--mode", default="ait", show_default=True)
@click.option("--devices", default="1,2", show_default=True, help="device counts to compare")
@click.argument("paths", nargs=-1, required=True)
def main(batch_size, mode, devices, paths):
    counts = [int(d) for d in devices.split(",")]
    rows = pick_rows(paths, batch_size, mode, counts)
    click.echo(f"global batch {batch_size} ({mode}): 1 device vs {counts[-1]} devices, each device running "
               f"batch / devices; latency = the slowest device's median, qps = global batch / latency")
    for line in format_table(rows, batch_size, counts):
        click.echo(line)
    if len(rows) < len(counts):
        click.echo(f"error: no result for devices {[n for n in counts if n not in rows]} in {', '.join(paths)}",
                   err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
