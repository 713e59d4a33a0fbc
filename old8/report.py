"""Turn the benchmarks' results files into one report: a markdown table and a chart.

    python3 report.py [--model-name M] [--results-dir DIR]

Reads every {M}_*_benchmark_dev_*.json in DIR (benchmark_ait.py and benchmark_pt.py, every mode,
batch size and device count) and writes DIR/M_report.md (the original example's table, plus a
speedup column, torch.compile columns and one table per device count) and DIR/M_report.png
(throughput and latency against batch size). Both files are replaced atomically.
"""
from __future__ import annotations

import glob
import io
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import click

DEFAULT_MODEL = "vit_base_patch16_224"  # the benchmarks' default (engine/cli.py)
SETUP_FIELDS = ("gpu", "driver", "torch", "dtype", "weights", "variant")  # rows differing in these do not compare
MODE_ORDER = ("eager", "ait", "compile", "reduce-overhead", "max-autotune")


# --- reading ---------------------------------------------------------------------------------

def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _clean(row, engine: str, mode: str):
    """The fields the report uses, or None for a row it cannot use."""
    if not isinstance(row, dict):
        return None
    batch, devices, latency, qps = (row.get("batch_size"), row.get("devices", 1), row.get("latency_ms"),
                                    row.get("qps"))
    if not (isinstance(batch, int) and batch > 0 and isinstance(devices, int) and devices > 0):
        return None
    if not (_number(latency) and latency > 0 or isinstance(latency, str)):
        return None
    if not _number(latency):
        qps = latency  # "OOM" in both columns
    elif not _number(qps):
        qps = batch * 1e3 / latency
    env = row.get("environment") if isinstance(row.get("environment"), dict) else {}
    return {"batch": batch, "devices": devices, "engine": str(row.get("engine", engine)),
            "mode": str(row.get("mode", mode)), "latency": latency, "qps": qps,
            "env": {**env, "variant": row.get("variant")}}


def load_rows(model: str, directory, warn=lambda m: click.echo(m, err=True)) -> list:
    """Every usable row for `model` in `directory`; per-device rows of data-parallel runs (those
    with a "rank") are left out, their aggregate row is what the tables show."""
    pattern = re.compile(rf"{re.escape(model)}_(ait|pt(?:_[\w-]+)?)_benchmark_dev_[^/]*\.json")
    rows = []
    for path in sorted(Path(directory).glob(f"{glob.escape(model)}_*_benchmark_dev_*.json")):
        match = pattern.fullmatch(path.name)
        if not match:
            continue
        engine, _, mode = match.group(1).partition("_")
        mode = mode or ("ait" if engine == "ait" else "eager")
        try:
            data = json.loads(path.read_text())
            raw = data["rows"]
            if not isinstance(raw, list):
                raise TypeError("'rows' is not a list")
        except (OSError, ValueError, KeyError, TypeError) as err:
            warn(f"warning: skipping {path}: unreadable results ({type(err).__name__}: {err})")
            continue
        raw = [r for r in raw if not (isinstance(r, dict) and ("rank" in r or r.get("model", model) != model))]
        good = [c for c in (_clean(r, engine, mode) for r in raw) if c is not None]
        if len(good) < len(raw):
            warn(f"warning: {path}: skipped {len(raw) - len(good)} malformed row(s)")
        rows += good
    return rows


def latest_per_cell(rows: list) -> tuple:
    """One row per (devices, engine, mode, batch): the most recent. Returns (rows, how many were dropped)."""
    cells = {}
    for row in sorted(rows, key=lambda r: str(r["env"].get("date", ""))):
        cells[(row["devices"], row["engine"], row["mode"], row["batch"])] = row
    return list(cells.values()), len(rows) - len(cells)


# --- the markdown report ---------------------------------------------------------------------

def series_label(engine: str, mode: str) -> str:
    if (engine, mode) == ("ait", "ait"):
        return "AIT"
    if (engine, mode) == ("pt", "eager"):
        return "PT"
    return f"{engine.upper()} {mode}"


def _series_order(key):
    engine, mode = key
    return (MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER), engine, mode)


def _fmt(value, spec="{:.2f}") -> str:
    if value is None:
        return ""
    return spec.format(value) if _number(value) else str(value)


def table(rows: list) -> list:
    """Markdown lines: the seed's five columns, the speedup, then one pair per other mode measured."""
    extra = sorted({(r["engine"], r["mode"]) for r in rows} - {("pt", "eager"), ("ait", "ait")}, key=_series_order)
    header = ["Batch size", "PT Latency (ms)", "PT QPS (im/s)", "AIT Latency (ms)", "AIT QPS (im/s)",
              "Speedup (PT / AIT)"]
    for key in extra:
        header += [f"{series_label(*key)} Latency (ms)", f"{series_label(*key)} QPS (im/s)"]
    cell = {(r["engine"], r["mode"], r["batch"]): r for r in rows}
    body = []
    for batch in sorted({r["batch"] for r in rows}):
        pt, ait = cell.get(("pt", "eager", batch)), cell.get(("ait", "ait", batch))
        line = [str(batch)]
        for r in (pt, ait):
            line += [_fmt(r and r["latency"]), _fmt(r and r["qps"])]
        timed = pt and ait and _number(pt["latency"]) and _number(ait["latency"])
        line.append(_fmt(pt["latency"] / ait["latency"], "{:.2f}x") if timed else "")
        for key in extra:
            r = cell.get((*key, batch))
            line += [_fmt(r and r["latency"]), _fmt(r and r["qps"])]
        body.append(line)
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(header)]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in [header] + body]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return out


def _values(rows: list, field: str) -> list:
    seen = []
    for r in rows:
        v = str(r["env"].get(field) or "unknown")
        if v not in seen:
            seen.append(v)
    return seen


def date_range(rows: list) -> str:
    dates = sorted(str(r["env"]["date"])[:10] for r in rows if r["env"].get("date"))
    if not dates:
        return "unknown"
    return dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"


def _device_suffix(devices: int) -> str:
    return "" if devices == 1 else f" on {devices} devices"


def mixed_note(rows: list) -> list:
    """Lines saying which setup fields differ between rows and which series used which value."""
    differing = [f for f in SETUP_FIELDS if len(_values(rows, f)) > 1]
    if not differing:
        return []
    out = ["> **Note: these results come from more than one machine or setup; compare across them with care.**"]
    for field in differing:
        parts = []
        for value in _values(rows, field):
            users = sorted({(r["devices"], r["engine"], r["mode"]) for r in rows
                            if str(r["env"].get(field) or "unknown") == value},
                           key=lambda k: (k[0], _series_order(k[1:])))
            parts.append(f"`{value}` ({', '.join(series_label(e, m) + _device_suffix(d) for d, e, m in users)})")
        out.append(f"> - {field}: " + "; ".join(parts))
    return out + [""]


def markdown(model: str, rows: list, dropped: int = 0) -> str:
    lines = [f"# {model}: benchmark report", ""]
    for name, field in (("GPU", "gpu"), ("Driver", "driver"), ("torch", "torch"), ("dtype", "dtype"),
                        ("Weights", "weights"), ("Variant", "variant")):
        lines.append(f"- {name}: {', '.join(_values(rows, field))}")
    lines += [f"- Date: {date_range(rows)}", ""]
    lines += mixed_note(rows)
    if dropped:
        lines += [f"_{dropped} result(s) were measured more than once; the most recent of each is shown._", ""]
    lines += ["_PT = PyTorch eager; AIT = this engine; Speedup = PT latency / AIT latency; "
              "PT compile / reduce-overhead / max-autotune = torch.compile with that mode; "
              "OOM = ran out of GPU memory._", ""]
    for devices in sorted({r["devices"] for r in rows}):
        lines += [f"## {devices} device{'s' if devices > 1 else ''}", ""]
        lines += table([r for r in rows if r["devices"] == devices]) + [""]
    return "\n".join(lines)


# --- the chart -------------------------------------------------------------------------------

def series_points(rows: list) -> dict:
    """{label: [(batch, qps, latency ms), ...]} for every series, OOM rows left out."""
    series = {}
    for r in sorted(rows, key=lambda r: (r["devices"], _series_order((r["engine"], r["mode"])), r["batch"])):
        if _number(r["latency"]):
            label = series_label(r["engine"], r["mode"]) + _device_suffix(r["devices"])
            series.setdefault(label, []).append((r["batch"], r["qps"], r["latency"]))
    return series


def chart_png(model: str, rows: list) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import LogFormatter

    fig = Figure(figsize=(12, 5), layout="constrained")
    FigureCanvasAgg(fig)
    qps_ax, lat_ax = fig.subplots(1, 2)
    batches = sorted({r["batch"] for r in rows})
    for label, points in series_points(rows).items():
        xs, qps, lat = zip(*points)
        qps_ax.plot(xs, qps, marker="o", label=label)
        lat_ax.plot(xs, lat, marker="o", label=label)
    for ax, ylabel in ((qps_ax, "throughput (images/s)"), (lat_ax, "latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch size")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    lat_ax.set_yscale("log")
    lat_ax.yaxis.set_major_formatter(LogFormatter())  # 0.5, 1, 10 rather than 10^0
    lat_ax.yaxis.set_minor_formatter(LogFormatter(minor_thresholds=(1, 0.4)))
    if qps_ax.lines:
        qps_ax.legend()
    fig.suptitle(f"{model} on {', '.join(_values(rows, 'gpu'))} ({date_range(rows)})")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


# --- writing ---------------------------------------------------------------------------------

def write_atomic(path: Path, data: bytes):
    """Write to a temporary file beside `path`, then rename it over `path`: readers see the old
    or the new whole file, never part of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@click.command()
@click.option("--model-name", "--model_name", "model_name", default=DEFAULT_MODEL, show_default=True,
              help="TIMM ViT name the benchmarks were run with")
@click.option("--results-dir", type=click.Path(file_okay=False), default=".", show_default=True,
              help="where the benchmarks wrote their results (the report is written there too)")
def main(model_name, results_dir):
    """Write MODEL_report.md and MODEL_report.png from the benchmarks' results."""
    rows, dropped = latest_per_cell(load_rows(model_name, results_dir))
    if not rows:
        where = "" if results_dir == "." else f" --output-dir {results_dir}"
        click.echo(f"error: no results for {model_name} in {results_dir}; run `python3 benchmark_ait.py "
                   f"--model-name {model_name}{where}` and `python3 benchmark_pt.py --model-name {model_name}"
                   f"{where}` first", err=True)
        sys.exit(1)
    md_path, png_path = (Path(results_dir) / f"{model_name}_report.{ext}" for ext in ("md", "png"))
    md, png = markdown(model_name, rows, dropped).encode(), chart_png(model_name, rows)
    try:
        write_atomic(md_path, md)
        write_atomic(png_path, png)
    except OSError as err:
        click.echo(f"error: cannot write the report in {results_dir}: {err.strerror or err}", err=True)
        sys.exit(1)
    click.echo(f"wrote {md_path} and {png_path} ({len(rows)} results)")


if __name__ == "__main__":
    main()
