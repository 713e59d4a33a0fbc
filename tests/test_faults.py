"""Bad input and faults: each gives a clear one-line error (never a traceback), and no result is lost.

One test (or a few) per row of the README's table. The command-line scripts are run in this
process as `__main__` (runpy), exactly as `python3 script.py ...` runs them, so their errors
are the ones a user sees; one test runs a script in a real subprocess as well.
"""
import json
import multiprocessing
import os
import re
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import engine.compile as ec
import engine.sweep as es
import weight_utils as wu
from engine import EngineError
from engine.results import append_line, check_writable, record, write_json_atomic
from engine.target import Target, detect
from engine.timing import Timing, measure
from modeling import ops
from modeling.config import UnsupportedModel, vit_config
from weight_utils import WeightError

ROOT = Path(__file__).resolve().parent.parent
MICRO = "vit_micro_patch8_32"
CPU = Target("cpu", torch.device("cpu"), "cpu")
SCRIPTS = ["verification.py", "benchmark_ait.py", "benchmark_pt.py", "weight_utils.py"]


def run_script(script, *args, capsys, monkeypatch, cwd):
    """Run `python3 script args...` in this process; (exit status, stdout, stderr)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
    capsys.readouterr()
    code = 0
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def cli(capsys, monkeypatch, tmp_path):
    def run(script, *args):
        return run_script(script, *args, capsys=capsys, monkeypatch=monkeypatch, cwd=tmp_path)
    return run


def one_line_error(code, err, *fragments):
    """Exit status 1, and stderr's only `error:` line holds every fragment; no traceback."""
    assert code == 1, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert "internal error" not in errors[0], errors[0]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="module")
def micro():
    """The micro model's config, TIMM model (seeded random weights) and TIMM state dict."""
    cfg = vit_config(MICRO)
    model, _ = wu.source_model(cfg, seed=0)
    return cfg, model, {k: v.clone() for k, v in model.state_dict().items()}


# --- unknown model name ------------------------------------------------------------------------

def test_unknown_model_names_the_closest_vits():
    with pytest.raises(UnsupportedModel, match=r"unknown model 'vit_bse_patch16_224'; closest TIMM ViT "
                                               r"names: .*vit_base_patch16_224"):
        vit_config("vit_bse_patch16_224")


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_model_from_every_script(cli, script):
    flag = "--model_name" if script == "weight_utils.py" else "--model-name"
    code, _, err = cli(script, flag, "vit_smal_patch16_224")
    one_line_error(code, err, "unknown model 'vit_smal_patch16_224'", "vit_small_patch16_224")


# --- unsupported block, pooling or activation --------------------------------------------------

@pytest.mark.parametrize("kwargs,feature", [
    (dict(global_pool="map"), "global_pool='map'"),
    (dict(act_layer="relu"), "activation ReLU"),
    (dict(act_layer="silu"), "activation SiLU"),
    (dict(qk_norm=True), "block 0: qk_norm"),
    (dict(norm_layer="rmsnorm"), "normalization RmsNorm"),
    (dict(dynamic_img_size=True), "dynamic_img_size"),
    (dict(img_size=30), "image size 30x30 not a multiple of the patch size 8x8"),
])
def test_unsupported_feature_is_named(kwargs, feature):
    with pytest.raises(UnsupportedModel, match=re.escape(feature)):
        vit_config(MICRO, **kwargs)


def test_unsupported_block_is_named():
    from timm.models.vision_transformer import ResPostBlock
    with pytest.raises(UnsupportedModel, match="block 0: block type ResPostBlock"):
        vit_config(MICRO, block_fn=ResPostBlock)


@pytest.mark.parametrize("name,feature", [
    ("vit_base_patch16_siglip_224", "global_pool='map'"),                # pooling
    ("vit_base_patch16_clip_quickgelu_224", "activation QuickGELU"),     # activation
    ("vit_base_patch16_rpn_224", "block type ResPostBlock"),              # block
    ("vit_relpos_base_patch16_224", "model class VisionTransformerRelPos"),
])
def test_unsupported_timm_model_fails_before_any_work(cli, monkeypatch, name, feature):
    import engine.target
    work = []
    monkeypatch.setattr(engine.target, "detect", lambda *a, **k: work.append("detect"))
    monkeypatch.setattr(wu, "source_model", lambda *a, **k: work.append("weights"))
    code, out, err = cli("benchmark_ait.py", "--model-name", name, "--variant", "timm")
    one_line_error(code, err, f"{name}: unsupported by this engine", feature)
    assert work == [] and out == ""


# --- batch size negative or not an integer -----------------------------------------------------

@pytest.mark.parametrize("script", ["verification.py", "benchmark_ait.py", "benchmark_pt.py"])
@pytest.mark.parametrize("value", ["-1", "1.5", "four"])
def test_bad_batch_size_is_a_usage_error(cli, script, value):
    code, out, err = cli(script, "--model-name", MICRO, "--batch-size", value)
    assert code == 2 and "Traceback" not in err
    assert "Usage:" in err and "Invalid value for '--batch-size'" in err


# --- checkpoint missing, unreadable, truncated, not a checkpoint -------------------------------

def _save_both(state, tmp_path, stem="ckpt"):
    from safetensors.torch import save_file
    save_file(state, str(tmp_path / f"{stem}.safetensors"))
    torch.save(state, tmp_path / f"{stem}.pth")
    return tmp_path / f"{stem}.safetensors", tmp_path / f"{stem}.pth"


def _halve(path: Path) -> Path:
    data = path.read_bytes()
    cut = path.with_name(f"cut_{path.name}")
    cut.write_bytes(data[: len(data) // 2])
    return cut


def test_good_checkpoints_load(micro, tmp_path):
    cfg, _, state = micro
    for path in _save_both(state, tmp_path):
        source = wu.load_into_timm(cfg.timm_model(), path)
        assert source.kind == "checkpoint" and str(path) in source.detail


def _bad_checkpoints(state, tmp_path):
    st, pth = _save_both(state, tmp_path)
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "text.pth").write_text("not a checkpoint\n")
    (tmp_path / "text.safetensors").write_text("not a checkpoint either\n")
    (tmp_path / "weights.txt").write_text("1 2 3\n")
    (tmp_path / "garbage.npz").write_bytes(b"\x00" * 64)
    torch.save({"a": [1, 2]}, tmp_path / "lists.pth")
    (tmp_path / "a_dir.pth").mkdir()
    return [
        (tmp_path / "missing.safetensors", "no such file"),
        (tmp_path / "a_dir.pth", "is a directory"),
        (tmp_path / "empty.pth", "empty file"),
        (_halve(st), "not a readable safetensors file"),
        (_halve(pth), "truncated or damaged PyTorch checkpoint"),
        (tmp_path / "text.pth", "not a PyTorch zip checkpoint"),
        (tmp_path / "text.safetensors", "not a readable safetensors file"),
        (tmp_path / "weights.txt", "unknown checkpoint type .txt"),
        (tmp_path / "garbage.npz", "not a readable .npz archive"),
        (tmp_path / "lists.pth", "not a state dict of tensors"),
    ]


def test_bad_checkpoint_names_file_and_problem(micro, tmp_path):
    cfg, _, state = micro
    for path, problem in _bad_checkpoints(state, tmp_path):
        with pytest.raises(WeightError) as info:
            wu.load_into_timm(cfg.timm_model(), path)
        message = str(info.value)
        assert message.startswith(f"{path}: ") and problem in message and "\n" not in message, message


def test_unreadable_checkpoint(micro, tmp_path, monkeypatch):
    cfg, _, state = micro
    path, _ = _save_both(state, tmp_path)
    path.chmod(0)
    if os.access(path, os.R_OK):  # root reads anything: make os.access say what it would say to a user
        real_access = os.access
        monkeypatch.setattr(os, "access",
                            lambda p, mode, **kw: str(p) != str(path) and real_access(p, mode, **kw))
    with pytest.raises(WeightError, match=re.escape(f"{path}: not readable (permission denied)")):
        wu.load_into_timm(cfg.timm_model(), path)


def test_bad_checkpoints_from_the_scripts(micro, cli, tmp_path):
    """weight_utils.py (run as __main__: its WeightError must still be caught) and verification.py."""
    cfg, _, state = micro
    cases = _bad_checkpoints(state, tmp_path)
    for path, problem in cases:
        code, _, err = cli("weight_utils.py", "--model_name", MICRO, "--checkpoint", path,
                           "--param-path", tmp_path / "out.safetensors")
        one_line_error(code, err, str(path), problem)
    for path, problem in cases[3:5]:
        code, _, err = cli("verification.py", "--model-name", MICRO, "--checkpoint", path)
        one_line_error(code, err, str(path), problem)
    assert not (tmp_path / "out.safetensors").exists()


def test_truncated_checkpoint_in_a_real_subprocess(micro, tmp_path):
    _, _, state = micro
    cut = _halve(_save_both(state, tmp_path)[1])
    proc = subprocess.run([sys.executable, str(ROOT / "weight_utils.py"), "--model_name", MICRO,
                           "--checkpoint", str(cut)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f"error: {cut}: truncated or damaged PyTorch checkpoint (its zip directory is missing)\n"


# --- checkpoint of another architecture --------------------------------------------------------

def test_checkpoint_of_another_architecture_names_keys_and_shapes(micro, tmp_path):
    cfg, _, _ = micro
    wider, _ = wu.source_model(vit_config(MICRO, embed_dim=32), seed=0)
    deeper, _ = wu.source_model(vit_config(MICRO, depth=3), seed=0)
    wide_path, _ = _save_both(wider.state_dict(), tmp_path, "wide")
    _, deep_path = _save_both(deeper.state_dict(), tmp_path, "deep")
    with pytest.raises(WeightError, match=re.escape("does not fit this architecture: shape mismatch "
                                                    "cls_token (1, 1, 32) vs (1, 1, 64)")):
        wu.load_into_timm(cfg.timm_model(), wide_path)
    with pytest.raises(WeightError, match=re.escape("unexpected blocks.2.norm1.weight (64,)")):
        wu.load_into_timm(cfg.timm_model(), deep_path)
    small = {k: v for k, v in deeper.state_dict().items() if not k.startswith("head.")}
    _, head_less = _save_both(small, tmp_path, "headless")
    with pytest.raises(WeightError, match=re.escape("missing head.weight (10, 64), head.bias (10,)")):
        wu.load_into_timm(cfg.timm_model(), head_less)


def test_checkpoint_of_another_architecture_from_the_script(micro, cli, tmp_path):
    wider, _ = wu.source_model(vit_config(MICRO, embed_dim=32), seed=0)
    path, _ = _save_both(wider.state_dict(), tmp_path, "wide")
    code, _, err = cli("benchmark_pt.py", "--model-name", MICRO, "--variant", "timm", "--checkpoint", path,
                       "--output-dir", tmp_path)
    one_line_error(code, err, str(path), "shape mismatch cls_token (1, 1, 32) vs (1, 1, 64)")


# --- pickle files, and .pth files that need code execution -------------------------------------

class Payload:
    """Stands for any object whose unpickling runs code: weights_only loading must refuse it."""


def test_pickle_file_refused(tmp_path):
    path = tmp_path / "model.pkl"
    path.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(WeightError, match="pickle files are refused: loading one can execute arbitrary code"):
        wu.load_state_dict(path)


def test_pth_needing_code_execution_refused(micro, cli, tmp_path):
    _, _, state = micro
    path = tmp_path / "evil.pth"
    torch.save({**state, "extra": Payload()}, path)
    with pytest.raises(WeightError, match=r"refused: loading it would execute code \(it references \S*Payload;"):
        wu.load_state_dict(path)
    legacy = tmp_path / "legacy.pth"
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(WeightError, match="legacy or raw pickle formats are refused"):
        wu.load_state_dict(legacy)
    code, _, err = cli("weight_utils.py", "--model_name", MICRO, "--checkpoint", path)
    one_line_error(code, err, str(path), "refused: loading it would execute code")


# --- engine weight file from another model or dtype --------------------------------------------

def test_engine_weight_file_of_another_model_or_dtype(micro, tmp_path):
    cfg, model, _ = micro
    path = tmp_path / "micro.safetensors"
    wu.save_engine_weights(path, wu.convert(model, cfg), cfg, torch.float32, wu.Source("random", "seed 0"))
    state, source = wu.load_engine_weights(path, cfg, torch.float32)
    assert source.kind == "engine file"
    with pytest.raises(WeightError, match=re.escape("holds float32 weights, this run wants float16")):
        wu.load_engine_weights(path, cfg, torch.float16)
    with pytest.raises(WeightError, match=r"made for another model: reg_tokens=0 \(want 2\)"):
        wu.load_engine_weights(path, vit_config(MICRO, reg_tokens=2), torch.float32)
    with pytest.raises(WeightError, match=r"made for another model: model_name='vit_micro_patch8_32' "
                                          r"\(want 'vit_tiny_patch16_224'\)"):
        wu.load_engine_weights(path, vit_config("vit_tiny_patch16_224"), torch.float32)
    with pytest.raises(WeightError, match="variant='timm' \\(want 'ait'\\)"):
        wu.load_engine_weights(path, vit_config(MICRO, "ait"), torch.float32)
    timm_file, _ = _save_both(model.state_dict(), tmp_path, "timm")
    with pytest.raises(WeightError, match="not an engine weight file"):
        wu.load_engine_weights(timm_file, cfg, torch.float32)
    with pytest.raises(WeightError, match="not a readable engine weight file"):
        wu.load_engine_weights(_halve(path), cfg, torch.float32)


def test_engine_weight_file_mismatch_from_the_scripts(micro, cli, tmp_path):
    cfg, model, _ = micro
    half = tmp_path / "micro_half.safetensors"
    wu.save_engine_weights(half, wu.convert(model, cfg), cfg, torch.float16, wu.Source("random", "seed 0"))
    code, _, err = cli("verification.py", "--model-name", MICRO, "--device", "cpu", "--param-path", half)
    one_line_error(code, err, str(half), "holds float16 weights, this run wants float32")
    code, _, err = cli("benchmark_ait.py", "--model-name", MICRO, "--device", "cpu", "--param-path", half,
                       "--output-dir", tmp_path)
    one_line_error(code, err, str(half), "made for another model: variant='timm' (want 'ait')")


# --- input of the wrong shape, dtype or device to a compiled model -----------------------------

def test_compiled_model_names_expected_and_given_input(micro):
    cfg, model, _ = micro
    compiled = ec.compile_engine(wu.build_engine(cfg, wu.convert(model, cfg), torch.float32, "cpu"), 2, CPU,
                                 ec.Options(), log=lambda m: None)
    assert compiled(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    expected = "expected shape (2, 3, 32, 32) float32 on cpu, given "
    for images, given in [(torch.randn(3, 3, 32, 32), "(3, 3, 32, 32) float32 on cpu"),
                          (torch.randn(2, 3, 24, 24), "(2, 3, 24, 24) float32 on cpu"),
                          (torch.randn(2, 3, 32, 32, dtype=torch.float16), "(2, 3, 32, 32) float16 on cpu"),
                          (torch.randn(2, 3, 32, 32, device="meta"), "(2, 3, 32, 32) float32 on meta")]:
        with pytest.raises(EngineError, match=re.escape(expected + given)):
            compiled(images)
    with pytest.raises(EngineError, match="expected a tensor of shape \\(2, 3, 32, 32\\), given ndarray"):
        compiled(torch.randn(2, 3, 32, 32).numpy())


# --- NaN or Inf in any output ------------------------------------------------------------------

@pytest.mark.parametrize("name,value,where", [
    ("blocks.1.fc1.weight", float("inf"), "block 1"),
    ("blocks.1.fc1.weight", float("nan"), "block 1"),
    ("blocks.0.qkv.bias", float("-inf"), "block 0"),
    ("pos_patch", float("nan"), "the patch embedding"),
    ("norm.weight", float("inf"), "the final norm / pooling"),
    ("head.weight", float("inf"), "the classifier head"),
])
def test_nonfinite_output_fails_verification_and_says_where(micro, name, value, where):
    from engine.verify import run_verification
    cfg, model, _ = micro
    state = wu.convert(model, cfg)
    state[name] = state[name].clone()
    state[name].view(-1)[3] = value
    report = run_verification(cfg, state, model, CPU, torch.float32, 2, ec.Options(), log=lambda m: None)
    assert not report.passed
    assert report.failures[0].startswith("non-finite output (")
    assert report.failures[0].endswith(f"; it first appears in the output of {where}"), report.failures[0]


def test_nonfinite_reference_or_nan_error_fails_compare():
    from engine.verify import compare
    ref = torch.randn(3, 10)
    bad_ref = ref.clone()
    bad_ref[1, 2] = float("nan")
    assert not compare(ref, bad_ref, torch.float32).passed
    bad_out = ref.clone()
    bad_out[2, 4] = float("inf")
    report = compare(bad_out, ref, torch.float32)
    assert report.failures[0] == "non-finite output (1 values, first at sample 2, class 4)"


def test_nonfinite_engine_file_fails_verification_from_the_script(micro, cli, tmp_path):
    cfg, model, _ = micro
    state = wu.convert(model, cfg)
    state["blocks.1.fc1.weight"] = state["blocks.1.fc1.weight"].clone()
    state["blocks.1.fc1.weight"][0, 0] = float("inf")
    path = tmp_path / "inf.safetensors"
    wu.save_engine_weights(path, state, cfg, torch.float32, wu.Source("random", "seed 0, one Inf planted"))
    code, out, err = cli("verification.py", "--model-name", MICRO, "--device", "cpu", "--batch-size", 2,
                         "--param-path", path)
    one_line_error(code, err, "vision transformer verification failed at batch size 2")
    assert re.search(r"FAIL: non-finite output \(.*\); it first appears in the output of block 1\n", out), out
    assert "verification pass" not in out


# --- GPU out of memory at one batch size of a sweep --------------------------------------------

def _fast_measure(fn, device, **_):
    return measure(fn, device, warmup_s=0.0, min_iters=2, max_iters=2, budget_s=0.0)


def test_oom_row_marked_and_sweep_goes_on(micro, tmp_path, monkeypatch):
    cfg, _, _ = micro
    monkeypatch.setattr(es, "measure", _fast_measure)
    built = []

    def make_runner(batch):
        built.append(batch)
        if batch == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if batch == 8:  # torch.compile wraps the OOM of its autotuning in its own error
            try:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            except torch.cuda.OutOfMemoryError as oom:
                raise RuntimeError("backend compiler failed") from oom
        return (lambda: None), {"plan": "fake"}

    complete = es.run_sweep("ait", "ait", cfg, CPU, torch.float32, [1, 2, 4, 8, 16], make_runner, tmp_path,
                            "stem", "random", log=lambda m: None)
    assert complete is False and built == [1, 2, 4, 8, 16]
    lines = (tmp_path / "stem.txt").read_text().splitlines()
    assert [line.split(",")[0] for line in lines] == [f"batch_size: {b}" for b in (1, 2, 4, 8, 16)]
    assert lines[1] == "batch_size: 2, latency: OOM" and lines[3] == "batch_size: 8, latency: OOM"
    rows = {r["batch_size"]: r for r in json.loads((tmp_path / "stem.json").read_text())["rows"]}
    assert rows[2]["latency_ms"] == "OOM" and rows[2]["qps"] is None
    assert isinstance(rows[4]["latency_ms"], float)
    assert es.run_sweep("ait", "ait", cfg, CPU, torch.float32, [1], make_runner, tmp_path, "stem", "random",
                        log=lambda m: None) is True


def test_sweep_does_not_hide_other_errors(micro, tmp_path):
    cfg, _, _ = micro

    def make_runner(batch):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        es.run_sweep("ait", "ait", cfg, CPU, torch.float32, [1], make_runner, tmp_path, "s", "r", log=lambda m: None)


@pytest.mark.parametrize("script,stem", [("benchmark_ait.py", f"{MICRO}_ait_benchmark_dev_-1"),
                                         ("benchmark_pt.py", f"{MICRO}_pt_benchmark_dev_-1")])
def test_partial_sweep_exits_3(cli, monkeypatch, tmp_path, no_gpu, script, stem):
    calls = []

    def measure_oom_at_batch_2(fn, device, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return Timing(1.0, 0.9, 1.1, 0.9, 2)
    monkeypatch.setattr(es, "measure", measure_oom_at_batch_2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("HIP_VISIBLE_DEVICES", raising=False)
    code, out, err = cli(script, "--model-name", MICRO, "--output-dir", tmp_path)
    assert code == 3 and "Traceback" not in err
    assert "error: the sweep was partial (some batch sizes ran out of memory)" in err
    lines = (tmp_path / f"{stem}.txt").read_text().splitlines()
    assert lines == ["batch_size: 1, latency: 1.0000", "batch_size: 2, latency: OOM", "batch_size: 4, latency: 1.0000"]


# --- stale, foreign or truncated cache entry under ./tmp ---------------------------------------

FAKE_GPU = Target("cuda", torch.device("cpu"), "Fake GPU")


def test_cache_entry_used_only_when_whole_and_matching(micro, tmp_path):
    cfg, _, _ = micro
    key = ec.cache_key(cfg, 4, torch.float16, FAKE_GPU, ec.Options())
    directory = ec.cache_dir(cfg, 4, torch.float16, tmp_path)
    plan = ops.Plan(norm="triton", residual="addmm")
    assert ec.load_cached_plan(directory, key) == (None, "no cache entry")
    ec.save_plan(directory, key, plan, {"norm": {"torch": 1.0, "triton": 0.5}})
    assert ec.load_cached_plan(directory, key) == (plan, None)
    for other, differs in [(ec.cache_key(cfg, 4, torch.float16, Target("cuda", FAKE_GPU.device, "Other GPU"),
                                         ec.Options()), "gpu"),
                           (ec.cache_key(vit_config(MICRO, reg_tokens=1), 4, torch.float16, FAKE_GPU, ec.Options()),
                            "config"),
                           (ec.cache_key(cfg, 4, torch.float16, FAKE_GPU, ec.Options(fp16_acc=True)), "options"),
                           (ec.cache_key(cfg, 4, torch.float16, FAKE_GPU, ec.Options(deterministic=True)), "options"),
                           ({**key, "torch": "1.0"}, "torch"), ({**key, "engine": "0"}, "engine")]:
        got, why = ec.load_cached_plan(directory, other)
        assert got is None and why.startswith("stale or foreign cache entry") and differs in why, why
    torch.use_deterministic_algorithms(True)  # torch's switch asks for determinism too
    try:
        assert ec.cache_key(cfg, 4, torch.float16, FAKE_GPU, ec.Options()) == \
            ec.cache_key(cfg, 4, torch.float16, FAKE_GPU, ec.Options(deterministic=True)) != key
    finally:
        torch.use_deterministic_algorithms(False)
    entry = directory / "plan.json"
    whole = entry.read_bytes()
    broken = [whole[: len(whole) // 2], b"", b"\xff\xfe\x00garbage", b"[1, 2]", b'{"key": 1}',
              json.dumps({"key": key, "plan": {"norm": "cuda-magic"}}).encode(),
              json.dumps({"key": key, "plan": ["triton"]}).encode(), json.dumps({"key": key}).encode()]
    for content in broken:
        entry.write_bytes(content)
        got, why = ec.load_cached_plan(directory, key)
        assert got is None and why is not None, content
    entry.unlink()
    entry.mkdir()
    assert ec.load_cached_plan(directory, key)[0] is None


def test_bad_cache_entry_is_rebuilt_never_used(micro, tmp_path, monkeypatch):
    cfg, model, _ = micro
    measured = []

    def fake_choose_plan(model, batch, target, options, use_graph=True):
        measured.append(batch)
        return ops.Plan(norm="triton"), {"norm": {"triton": 1.0}}
    monkeypatch.setattr(ec, "choose_plan", fake_choose_plan)
    logs = []
    engine_model = wu.build_engine(cfg, wu.convert(model, cfg), torch.float32, "cpu")

    def compile_once():
        return ec.compile_engine(engine_model, 2, FAKE_GPU, ec.Options(use_graph=False), tmp_path, log=logs.append)
    assert compile_once().info["plan_source"].startswith("measured") and measured == [2]
    assert compile_once().info["plan_source"].startswith("cached") and measured == [2]
    entry = ec.cache_dir(cfg, 2, torch.float32, tmp_path) / "plan.json"
    good = json.loads(entry.read_text())
    for damage in (lambda: entry.write_bytes(entry.read_bytes()[:40]),
                   lambda: entry.write_text(json.dumps({**good, "key": {**good["key"], "gpu": "Another GPU"}}))):
        damage()
        compiled = compile_once()
        assert compiled.info["plan_source"].startswith("measured") and compiled.plan == ops.Plan(norm="triton")
        assert json.loads(entry.read_text())["key"] == good["key"]
    assert measured == [2, 2, 2]
    assert "unreadable cache entry" in logs[0] and logs[0].endswith("rebuilding")
    assert "stale or foreign cache entry (differs in gpu)" in logs[1]


def test_the_end_to_end_check_runs_only_where_the_plan_asks_for_it(micro, tmp_path, monkeypatch):
    """compile_engine descends end to end only where choose_plan's report says the check follows; its
    result is the plan kept and cached, and its time is a phase of the report."""
    cfg, model, _ = micro
    checked = []

    def fake_choose_plan(check):
        def choose(model, batch, target, options, use_graph=True):
            return ops.Plan(norm="triton"), {"norm": {"triton": 1.0}, "phases_s": {}, "check_end_to_end": check}
        return choose

    def fake_refine_plan(plan, report, time_plans):
        checked.append(plan)
        return ops.Plan(norm="triton", norm_tile="r4w8"), {"plan@norm": 1.0, "norm=triton:r4w8": 0.9}
    monkeypatch.setattr(ec, "refine_plan", fake_refine_plan)
    engine_model = wu.build_engine(cfg, wu.convert(model, cfg), torch.float32, "cpu")
    for check in (False, True):
        monkeypatch.setattr(ec, "choose_plan", fake_choose_plan(check))
        compiled = ec.compile_engine(engine_model, 2, FAKE_GPU, ec.Options(use_graph=False), tmp_path / str(check),
                                     log=lambda line: None)
        measured = compiled.info["measured"]
        assert ("end_to_end" in measured) is check and ("end_to_end" in measured["phases_s"]) is check
        assert compiled.plan.norm_tile == ("r4w8" if check else "")
        cached = json.loads((ec.cache_dir(cfg, 2, torch.float32, tmp_path / str(check)) / "plan.json").read_text())
        assert ops.Plan(**cached["plan"]) == compiled.plan
    assert checked == [ops.Plan(norm="triton")]


# --- run killed in the middle ------------------------------------------------------------------

KILLED_WRITER = """
import sys
sys.path.insert(0, {root!r})
from engine.results import append_line, write_json_atomic
i = 0
while True:
    append_line({txt!r}, f"line {{i}} " + "x" * 3000 + " end")
    write_json_atomic({js!r}, {{"rows": [{{"i": i, "pad": "y" * 2000}}] * 300}})
    i += 1
"""


def test_killed_run_leaves_whole_lines_and_whole_json(tmp_path):
    txt, js = tmp_path / "r.txt", tmp_path / "r.json"
    code = KILLED_WRITER.format(root=str(ROOT), txt=str(txt), js=str(js))
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", code])
        deadline = time.time() + 60
        start = txt.stat().st_size if txt.exists() else 0
        while time.time() < deadline and (not txt.exists() or txt.stat().st_size < start + 60_000):
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = txt.read_text()
        assert data.endswith("\n")
        assert all(re.fullmatch(r"line \d+ x{3000} end", line) for line in data.splitlines())
        rows = json.loads(js.read_text())["rows"]
        assert len(rows) == 300 and len({r["i"] for r in rows}) == 1


def test_write_json_atomic_never_leaves_a_partial_file(tmp_path, monkeypatch):
    import engine.results as results
    path = tmp_path / "r.json"
    write_json_atomic(path, {"rows": [1, 2, 3]})

    def dump_then_die(obj, f, **kw):
        f.write('{"rows": [1, 2')
        raise KeyboardInterrupt
    monkeypatch.setattr(results.json, "dump", dump_then_die)
    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(path, {"rows": [4, 5, 6]})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"rows": [1, 2, 3]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_damaged_results_json_is_moved_aside_not_overwritten(tmp_path, capsys):
    (tmp_path / "s.json").write_text('{"rows": [{"batch_size": 1, "latency_ms": 2.0}')  # cut short
    record(tmp_path, "s", {"batch_size": 2, "latency_ms": 1.0, "mode": "ait"})
    assert [r["batch_size"] for r in json.loads((tmp_path / "s.json").read_text())["rows"]] == [2]
    aside = list(tmp_path.glob("s.json.damaged-*"))
    assert len(aside) == 1 and aside[0].read_text().startswith('{"rows": [{"batch_size": 1')
    assert "moved it aside" in capsys.readouterr().err


# --- two processes appending to one results file -----------------------------------------------

def _append_many(args):
    directory, proc, count = args
    for i in range(count):
        append_line(Path(directory) / "lines.txt", f"proc {proc} line {i} " + chr(97 + proc) * (500 + 37 * i % 4000))
        if i % 10 == 0:
            record(directory, "shared", {"batch_size": i, "latency_ms": float(proc), "mode": f"p{proc}"})


def test_concurrent_appends_never_tear_or_interleave(tmp_path):
    procs, count = 4, 200
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        pool.map(_append_many, [(str(tmp_path), p, count) for p in range(procs)])
    lines = (tmp_path / "lines.txt").read_text().splitlines()
    assert len(lines) == procs * count
    seen = set()
    for line in lines:
        m = re.fullmatch(r"proc (\d) line (\d+) ([a-z]+)", line)
        assert m, line[:80]
        p, i = int(m.group(1)), int(m.group(2))
        assert m.group(3) == chr(97 + p) * (500 + 37 * i % 4000)
        seen.add((p, i))
    assert len(seen) == procs * count
    assert len((tmp_path / "shared.txt").read_text().splitlines()) == procs * count // 10
    rows = json.loads((tmp_path / "shared.json").read_text())["rows"]
    assert len(rows) == procs * count // 10  # every process's every row: none lost to a race


# --- --device cuda with no GPU -----------------------------------------------------------------

def test_device_cuda_without_gpu(no_gpu, capsys):
    with pytest.raises(EngineError, match="--device cuda: no GPU is visible to torch"):
        detect("cuda")
    assert detect(None) == CPU
    assert "notice: no GPU found, running on the CPU" in capsys.readouterr().err


@pytest.mark.parametrize("script", ["verification.py", "benchmark_ait.py", "benchmark_pt.py"])
def test_device_cuda_without_gpu_from_the_scripts(cli, no_gpu, tmp_path, script):
    more = [] if script == "verification.py" else ["--output-dir", tmp_path]
    code, out, err = cli(script, "--model-name", MICRO, "--device", "cuda", *more)
    one_line_error(code, err, "--device cuda: no GPU is visible to torch")
    assert out == ""


def test_default_device_falls_back_to_cpu_with_a_notice(cli, no_gpu):
    code, out, err = cli("verification.py", "--model-name", MICRO, "--batch-size", 2)
    assert code == 0, err
    assert "notice: no GPU found, running on the CPU (reference path, float32)" in err
    assert "on cpu" in out and out.rstrip().endswith("vision transformer verification pass")


# --- output directory not writable -------------------------------------------------------------

def test_unwritable_output_directory(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(EngineError, match="output directory .*/file/sub is not writable \\(Not a directory\\)"):
        check_writable(tmp_path / "file" / "sub")


def test_read_only_output_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK) and os.geteuid() == 0:
            pytest.skip("running as root: chmod does not stop writes")
        with pytest.raises(EngineError, match="is not writable"):
            check_writable(ro)
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("script", ["benchmark_ait.py", "benchmark_pt.py"])
def test_unwritable_output_directory_fails_before_any_benchmark(cli, monkeypatch, tmp_path, script):
    ran = []
    monkeypatch.setattr(es, "run_sweep", lambda *a, **k: ran.append(1))
    monkeypatch.setattr(wu, "source_model", lambda *a, **k: ran.append(2))
    (tmp_path / "file").write_text("")
    out_dir = tmp_path / "file" / "sub"
    code, out, err = cli(script, "--model-name", MICRO, "--device", "cpu", "--output-dir", out_dir)
    one_line_error(code, err, f"output directory {out_dir} is not writable")
    assert ran == [] and out == ""


def test_unwritable_weight_file_directory_fails_before_converting(cli, monkeypatch, tmp_path):
    converted = []
    monkeypatch.setattr(wu, "source_model", lambda *a, **k: converted.append(1))
    (tmp_path / "file").write_text("")
    code, out, err = cli("weight_utils.py", "--model_name", MICRO, "--param-path", tmp_path / "file" / "w.safetensors")
    one_line_error(code, err, f"output directory {tmp_path / 'file'} is not writable")
    assert converted == [] and out == ""
