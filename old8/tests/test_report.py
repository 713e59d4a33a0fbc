"""report.py on synthetic results files: tables, speedup, compile and multi-device columns, OOM,
mixed setups, missing or corrupt results, and the chart."""
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

import report

M = "vit_base_patch16_224"
ENV = {"date": "2025-03-01T10:00:00+00:00", "gpu": "NVIDIA H100 80GB HBM3", "driver": "550.54",
       "torch": "2.5.1", "cuda": "12.4", "dtype": "float16", "weights": "random (seed 0)"}
SEED_HEADER = ["Batch size", "PT Latency (ms)", "PT QPS (im/s)", "AIT Latency (ms)", "AIT QPS (im/s)"]


def row(batch, latency, engine="ait", mode="ait", devices=1, **extra):
    r = {"batch_size": batch, "latency_ms": latency, "engine": engine, "mode": mode, "devices": devices,
         "model": M, "variant": "ait", "environment": dict(ENV),
         "qps": None if latency == "OOM" else batch * 1e3 / latency,
         "timing": {"median_ms": latency}}
    env = extra.pop("env", {})
    r["environment"].update(env)
    r.update(extra)
    return r


def write(directory, engine_part, rows, flag="0"):
    path = directory / f"{M}_{engine_part}_benchmark_dev_{flag}.json"
    path.write_text(json.dumps({"rows": rows}))
    return path


def run(directory, *args):
    result = CliRunner().invoke(report.main, ["--model-name", M, "--results-dir", str(directory), *args])
    return result


def tables(md: str) -> dict:
    """{section heading: [header cells, row cells...]} from the report's markdown."""
    out, heading = {}, None
    for line in md.splitlines():
        if line.startswith("## "):
            heading = line[3:]
            out[heading] = []
        elif line.startswith("|") and not line.startswith("|-") and heading:
            out[heading].append([c.strip() for c in line.strip("|").split("|")])
    return out


def report_md(directory) -> str:
    return (directory / f"{M}_report.md").read_text()


@pytest.fixture
def basic(tmp_path):
    write(tmp_path, "ait", [row(1, 1.25), row(2, 1.5), row(4, 2.0)])
    write(tmp_path, "pt", [row(1, 5.0, "pt", "eager"), row(2, 6.0, "pt", "eager"), row(4, 8.0, "pt", "eager")])
    return tmp_path


def test_table_has_the_seed_columns_values_and_speedup(basic):
    result = run(basic)
    assert result.exit_code == 0, result.output
    md = report_md(basic)
    t = tables(md)
    assert list(t) == ["1 device"]
    header, *body = t["1 device"]
    assert header == SEED_HEADER + ["Speedup (PT / AIT)"]
    assert body == [["1", "5.00", "200.00", "1.25", "800.00", "4.00x"],
                    ["2", "6.00", "333.33", "1.50", "1333.33", "4.00x"],
                    ["4", "8.00", "500.00", "2.00", "2000.00", "4.00x"]]
    lines = md.splitlines()
    first = lines.index(next(line for line in lines if line.startswith("| Batch size")))
    # the seed's markdown: a dashed separator under the header, cells padded to the column width
    assert lines[first + 1] == "|" + "|".join("-" * (len(h) + 2) for h in header) + "|"
    assert lines[first + 2].startswith("| 1          | 5.00            |")
    assert "compile" not in lines[first]


def test_speedup_left_empty_where_one_side_is_missing(tmp_path):
    write(tmp_path, "ait", [row(1, 2.0), row(8, 4.0)])
    write(tmp_path, "pt", [row(1, 3.0, "pt", "eager"), row(2, 5.0, "pt", "eager")])
    assert run(tmp_path).exit_code == 0
    body = tables(report_md(tmp_path))["1 device"][1:]
    assert body == [["1", "3.00", "333.33", "2.00", "500.00", "1.50x"],
                    ["2", "5.00", "400.00", "", "", ""],
                    ["8", "", "", "4.00", "2000.00", ""]]


def test_compile_columns_one_pair_per_mode_measured(basic):
    write(basic, "pt_max-autotune", [row(1, 2.5, "pt", "max-autotune")])
    write(basic, "pt_compile", [row(1, 3.0, "pt", "compile"), row(2, 4.0, "pt", "compile")])
    assert run(basic).exit_code == 0
    header, *body = tables(report_md(basic))["1 device"]
    assert header[6:] == ["PT compile Latency (ms)", "PT compile QPS (im/s)",
                          "PT max-autotune Latency (ms)", "PT max-autotune QPS (im/s)"]
    assert body[0][6:] == ["3.00", "333.33", "2.50", "400.00"]
    assert body[1][6:] == ["4.00", "500.00", "", ""]
    assert body[0][5] == "4.00x"  # the speedup stays PT eager / AIT


def test_multi_device_rows_get_their_own_table_and_per_rank_rows_are_left_out(basic):
    write(basic, "ait", [row(1, 1.25), row(2, 1.5), row(4, 2.0), row(4, 2.5, devices=2, qps=3200.0),
                         row(4, 9.9, devices=2, rank=0), row(4, 9.8, devices=2, rank=1), row(8, 3.0, devices=2)])
    write(basic, "pt", [row(1, 5.0, "pt", "eager"), row(4, 10.0, "pt", "eager", devices=2)], flag="0_1")
    assert run(basic).exit_code == 0
    md = report_md(basic)
    t = tables(md)
    assert list(t) == ["1 device", "2 devices"]
    assert t["2 devices"][0] == SEED_HEADER + ["Speedup (PT / AIT)"]
    assert t["2 devices"][1:] == [["4", "10.00", "400.00", "2.50", "3200.00", "4.00x"],
                                  ["8", "", "", "3.00", "2666.67", ""]]
    assert [r[0] for r in t["1 device"][1:]] == ["1", "2", "4"]
    assert "9.90" not in md and "9.80" not in md


def test_oom_rows_show_oom(basic):
    write(basic, "pt", [row(1, 5.0, "pt", "eager"), row(2, "OOM", "pt", "eager"), row(4, "OOM", "pt", "eager")])
    write(basic, "pt_compile", [row(4, "OOM", "pt", "compile")])
    assert run(basic).exit_code == 0
    body = tables(report_md(basic))["1 device"][1:]
    assert body[1] == ["2", "OOM", "OOM", "1.50", "1333.33", "", "", ""]
    assert body[2] == ["4", "OOM", "OOM", "2.00", "2000.00", "", "OOM", "OOM"]
    points = report.series_points(report.load_rows(M, basic))
    assert points["PT"] == [(1, 200.0, 5.0)]  # no OOM points on the chart
    assert "PT compile" not in points


def test_header_states_the_setup_and_date_range(basic):
    write(basic, "pt", [row(1, 5.0, "pt", "eager", env={"date": "2025-03-04T08:00:00+00:00"})])
    assert run(basic).exit_code == 0
    md = report_md(basic)
    for line in ["- GPU: NVIDIA H100 80GB HBM3", "- Driver: 550.54", "- torch: 2.5.1", "- dtype: float16",
                 "- Weights: random (seed 0)", "- Date: 2025-03-01 to 2025-03-04"]:
        assert line in md.splitlines()
    assert "more than one machine" not in md


def test_mixed_setups_are_named_above_the_table(basic):
    write(basic, "pt", [row(b, 5.0 * b, "pt", "eager", env={"gpu": "NVIDIA A100-SXM4-40GB", "torch": "2.4.0"})
                        for b in (1, 2)])
    assert run(basic).exit_code == 0
    md = report_md(basic)
    lines = md.splitlines()
    note = lines.index(next(line for line in lines if "more than one machine or setup" in line))
    assert note < lines.index("## 1 device")
    assert "> - gpu: `NVIDIA H100 80GB HBM3` (AIT); `NVIDIA A100-SXM4-40GB` (PT)" in lines
    assert "> - torch: `2.5.1` (AIT); `2.4.0` (PT)" in lines
    assert not any(line.startswith("> - driver") or line.startswith("> - dtype") for line in lines)
    assert "- GPU: NVIDIA H100 80GB HBM3, NVIDIA A100-SXM4-40GB" in lines


@pytest.mark.parametrize("field,value", [("dtype", "bfloat16"), ("weights", "timm hub"), ("driver", "535.1")])
def test_each_setup_field_triggers_the_note(basic, field, value):
    write(basic, "pt_compile", [row(1, 3.0, "pt", "compile", env={field: value})])
    assert run(basic).exit_code == 0
    assert f"> - {field}: `{ENV[field]}` (PT, AIT); `{value}` (PT compile)" in report_md(basic).splitlines()


def test_a_cell_measured_twice_shows_the_latest_and_says_so(basic):
    write(basic, "ait", [row(1, 9.0, env={"date": "2025-01-01T00:00:00+00:00"})], flag="1")
    assert run(basic).exit_code == 0
    md = report_md(basic)
    assert tables(md)["1 device"][1][3] == "1.25"
    assert "1 result(s) were measured more than once" in md


def test_no_results_says_what_to_run_and_exits_nonzero(tmp_path):
    (tmp_path / "vit_large_patch16_384_ait_benchmark_dev_0.json").write_text(json.dumps({"rows": [row(1, 1.0)]}))
    result = run(tmp_path)
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert f"python3 benchmark_ait.py --model-name {M} --output-dir {tmp_path}" in lines[0]
    assert f"python3 benchmark_pt.py --model-name {M}" in lines[0]
    assert not (tmp_path / f"{M}_report.md").exists()


def test_no_results_from_a_real_process_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, report.__file__, "--model-name", M], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert proc.stderr.strip() == (f"error: no results for {M} in .; run `python3 benchmark_ait.py --model-name {M}` "
                                   f"and `python3 benchmark_pt.py --model-name {M}` first")


def test_corrupt_files_are_skipped_with_a_warning(basic):
    bad = basic / f"{M}_pt_compile_benchmark_dev_0.json"
    bad.write_text('{"rows": [')
    (basic / f"{M}_pt_max-autotune_benchmark_dev_0.json").write_text('["not", "rows"]')
    result = run(basic)
    assert result.exit_code == 0
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2
    assert str(bad) in warnings[0] or str(bad) in warnings[1]
    assert "compile" not in tables(report_md(basic))["1 device"][0][-1]


def test_only_corrupt_files_is_no_results(tmp_path):
    write(tmp_path, "ait", []).write_text("\x00garbage")
    result = run(tmp_path)
    assert result.exit_code == 1
    assert "warning: skipping" in result.output and "no results" in result.output
    assert "Traceback" not in result.output


def test_other_models_are_not_mixed_in(basic):
    other = f"{M}_in21k_ait_benchmark_dev_0.json"
    (basic / other).write_text(json.dumps({"rows": [dict(row(1, 0.5), model=f"{M}_in21k")]}))
    write(basic, "pt_compile", [dict(row(1, 0.7, "pt", "compile"), model="vit_small_patch16_224")])
    assert run(basic).exit_code == 0
    md = report_md(basic)
    assert "0.50" not in md and "0.70" not in md and "compile" not in tables(md)["1 device"][0][-1]


def test_png_is_written_whole_and_no_temporary_files_are_left(basic):
    write(basic, "ait", [row(1, 1.25), row(2, 1.5), row(4, 2.0), row(4, 2.5, devices=2)])
    assert run(basic).exit_code == 0
    png = basic / f"{M}_report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
    assert sorted(p.name for p in basic.iterdir() if p.name.startswith(".")) == []
    points = report.series_points(report.load_rows(M, basic))
    assert list(points) == ["PT", "AIT", "AIT on 2 devices"]
    assert points["AIT"] == [(1, 800.0, 1.25), (2, 1333.3333333333333, 1.5), (4, 2000.0, 2.0)]


def test_a_failed_write_leaves_the_old_report(basic, monkeypatch):
    assert run(basic).exit_code == 0
    before = {p: (basic / p).read_bytes() for p in (f"{M}_report.md", f"{M}_report.png")}
    write(basic, "ait", [row(1, 0.5)])

    def refuse(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", refuse)
    result = run(basic)
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].endswith("No space left on device")
    assert {p: (basic / p).read_bytes() for p in before} == before
    assert [p.name for p in basic.iterdir() if p.name.endswith(".tmp")] == []
