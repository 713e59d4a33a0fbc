"""The one results writer.

Two files per benchmark, named as the original example named them:
  {model}_{engine}_benchmark_dev_{flag}.txt   `batch_size: N, latency: T` lines (T in ms), appended
  {model}_{engine}_benchmark_dev_{flag}.json  every row with its timing spread and environment

Lines are appended with one write() under an exclusive lock, so two processes never tear or
interleave a line and a killed run leaves only whole lines. The JSON is rewritten to a
temporary file and renamed over the old one, so it is always the old or the new whole file.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from . import EngineError


def results_stem(model_name: str, engine: str, flag: str) -> str:
    return f"{model_name}_{engine}_benchmark_dev_{flag}"


def check_writable(directory, what: str = "output directory") -> Path:
    """Fail before any benchmark runs if results could not be written."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise EngineError(f"{what} {directory} is not writable ({err.strerror or err})") from None
    return directory


@contextmanager
def _locked(path: Path):
    fd = os.open(str(path) + ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def append_line(path, line: str):
    path = Path(path)
    data = (line.rstrip("\n") + "\n").encode()
    with _locked(path):
        fd = os.open(str(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


def write_json_atomic(path, obj):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_rows(path) -> list:
    """The "rows" list of a results JSON file; raises on a missing or malformed file."""
    with open(path) as f:
        rows = json.load(f)["rows"]
    if not isinstance(rows, list):
        raise ValueError("rows is not a list")
    return rows


def read_json_rows(path) -> list:
    try:
        return _load_rows(path)
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _rows_to_update(json_path: Path) -> list:
    """The rows already in `json_path`. A file there that does not parse (edited by hand, or
    damaged) is moved aside rather than overwritten, so no earlier result is lost."""
    try:
        return _load_rows(json_path)
    except FileNotFoundError:
        return []
    except (ValueError, KeyError, TypeError):
        pass
    aside = json_path.with_name(f"{json_path.name}.damaged-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    os.replace(json_path, aside)
    print(f"warning: {json_path} did not parse; moved it aside to {aside.name}", file=sys.stderr)
    return []


def record(directory, stem: str, row: dict):
    """Append the text line and merge `row` into the JSON file (replacing a row of the same key)."""
    directory = Path(directory)
    latency = row["latency_ms"]
    text = f"batch_size: {row['batch_size']}, latency: {latency if isinstance(latency, str) else f'{latency:.4f}'}"
    if row.get("devices", 1) > 1:
        qps = row.get("qps")
        text += f", devices: {row['devices']}, qps: {'OOM' if qps is None else f'{qps:.2f}'}"
        if row.get("rank") is not None:  # one device's share of a data-parallel run
            text += f", rank: {row['rank']}, local_batch_size: {row['local_batch_size']}"
    append_line(directory / f"{stem}.txt", text)
    json_path = directory / f"{stem}.json"
    key = lambda r: (r.get("batch_size"), r.get("devices", 1), r.get("mode"), r.get("rank"),
                     r.get("environment", {}).get("gpu"), r.get("environment", {}).get("dtype"))
    with _locked(json_path):
        rows = [r for r in _rows_to_update(json_path) if key(r) != key(row)]
        rows.append(row)
        rows.sort(key=lambda r: (str(r.get("mode")), r.get("devices", 1), r.get("batch_size", 0)))
        write_json_atomic(json_path, {"rows": rows})


def _driver_version() -> str:
    if getattr(torch.version, "hip", None):
        return f"hip {torch.version.hip}"
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10).stdout.strip().splitlines()
            return out[0] if out else "unknown"
        except (OSError, subprocess.SubprocessError):
            pass
    return "unknown"


def environment(target, dtype: torch.dtype, source: Optional[str] = None, **extra) -> dict:
    """What a reader needs to trust and reproduce a row."""
    import timm
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": target.name,
        "target": target.kind,
        "driver": _driver_version() if target.is_gpu else "none",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "dtype": str(dtype).replace("torch.", ""),
        "weights": source,
    }
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env.update(extra)
    return env
