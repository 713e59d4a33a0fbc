"""Target selection (CUDA, ROCm, CPU) and what each target implies, with torch's answers
monkeypatched so every path runs on a machine without GPUs."""
import pytest
import torch

from engine import EngineError
from engine import target as target_mod
from engine.distributed import backend_for
from engine.target import Target, detect, visible_devices_flag


def fake_gpus(monkeypatch, hip, count=2, name="GPU"):
    monkeypatch.setattr(torch.version, "hip", hip, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: chosen.append(i))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: f"{name} {i}")
    return chosen


def test_rocm_is_detected_from_torch_version_hip(monkeypatch):
    chosen = fake_gpus(monkeypatch, "6.2.41133", name="AMD Instinct MI250X/MI250")
    t = detect()
    assert t.kind == "rocm" and t.is_gpu and t.device == torch.device("cuda", 0)
    assert t.name == "AMD Instinct MI250X/MI250 0" and chosen == [0]
    assert "cudnn" not in t.attention_backends  # cuDNN attention is CUDA-only
    assert set(t.attention_backends) == {"flash", "efficient", "triton"}
    assert t.graphs_by_default is False          # off on ROCm, as the original ran there
    assert t.use_graph(None) is False and t.use_graph(True) is True  # --use-graph True turns them on
    assert t.visible_devices_var == "HIP_VISIBLE_DEVICES"
    assert backend_for(t) == "nccl"              # RCCL answers to "nccl" in torch
    assert t.default_dtype == torch.float16


def test_cuda_when_torch_has_no_hip(monkeypatch):
    fake_gpus(monkeypatch, None, name="NVIDIA H100")
    t = detect("cuda")
    assert t.kind == "cuda"
    assert t.attention_backends[0] == "cudnn"
    assert t.graphs_by_default is True and t.use_graph(None) is True and t.use_graph(False) is False
    assert t.visible_devices_var == "CUDA_VISIBLE_DEVICES"
    assert backend_for(t) == "nccl"


@pytest.mark.parametrize("hip", [None, "6.2"])
def test_local_rank_picks_the_device(monkeypatch, hip):
    chosen = fake_gpus(monkeypatch, hip, count=2)
    assert detect(local_rank=1).device == torch.device("cuda", 1)
    assert detect(local_rank=3).device == torch.device("cuda", 1)
    assert chosen == [1, 1]


def test_cpu_without_gpus(monkeypatch, capsys):
    fake_gpus(monkeypatch, None, count=0)
    t = detect()
    assert t.kind == "cpu" and not t.is_gpu
    assert t.attention_backends == ("math",)
    assert t.use_graph(None) is False and t.use_graph(True) is False  # no graphs on a CPU
    assert backend_for(t) == "gloo"
    assert t.default_dtype == torch.float32
    assert "no GPU found" in capsys.readouterr().err
    detect(quiet=True)
    assert capsys.readouterr().err == ""


def test_asking_for_a_gpu_without_one_names_the_right_variable(monkeypatch):
    fake_gpus(monkeypatch, "6.2", count=0)
    monkeypatch.setenv("HIP_VISIBLE_DEVICES", "7")
    with pytest.raises(EngineError, match="HIP_VISIBLE_DEVICES=7"):
        detect("cuda")
    fake_gpus(monkeypatch, None, count=0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(EngineError, match="CUDA_VISIBLE_DEVICES=unset"):
        detect("cuda")


def test_visible_devices_flag_per_target(monkeypatch):
    rocm = Target("rocm", torch.device("cuda", 0), "MI250")
    cuda = Target("cuda", torch.device("cuda", 0), "H100")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("HIP_VISIBLE_DEVICES", raising=False)
    assert visible_devices_flag(rocm) == "-1"
    monkeypatch.setenv("HIP_VISIBLE_DEVICES", "0,1")
    assert visible_devices_flag(rocm) == "0_1"
    assert visible_devices_flag(cuda) == "-1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert visible_devices_flag(cuda) == "3"
    assert visible_devices_flag(rocm) == "0_1"


def test_gpu_kind_follows_torch(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "5.7", raising=False)
    assert target_mod.gpu_kind() == "rocm"
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    assert target_mod.gpu_kind() == "cuda"
