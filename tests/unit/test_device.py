"""--device: parsed at start, resolved against this onnxruntime build, refused with what to do."""

from __future__ import annotations

import subprocess
import sys

import onnxruntime as ort
import pytest

from ragmix.config import ServerConfig
from ragmix.errors import BundleError, ValidationError
from ragmix.models import device as dev
from ragmix.models.encoder import Encoder

HAS_CUDA = dev.CUDA in ort.get_available_providers()


@pytest.mark.parametrize(
    ("text", "want"),
    [("auto", ("auto", None)), ("cpu", ("cpu", None)), ("CUDA", ("cuda", None)),
     ("cuda:3", ("cuda", 3)), (" cuda:0 ", ("cuda", 0))],
)  # fmt: skip
def test_device_specs_parse(text, want):
    assert dev.parse(text) == want


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cpu:0", "cuda:-1", "cuda:1234", "", "auto:1"])
def test_bad_device_specs_are_refused_naming_the_forms(text):
    with pytest.raises(ValidationError, match=r"device must be auto, cpu, cuda or cuda:N"):
        dev.parse(text)
    with pytest.raises(ValidationError, match="device"):
        ServerConfig(device=text).validate()


def test_cpu_and_auto_without_cuda_resolve_to_the_cpu():
    assert dev.resolve("cpu") == dev.Device("cpu")
    assert dev.resolve("cpu").providers() == [dev.CPU]
    if not HAS_CUDA:
        assert str(dev.resolve("auto")) == "cpu"
    assert dev.Device("cuda", 2).providers() == [(dev.CUDA, {"device_id": 2}), dev.CPU]


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has the CUDA provider")
def test_cuda_without_onnxruntime_gpu_is_refused_with_what_to_install():
    with pytest.raises(ValidationError, match=r"ragmix\[gpu\]") as e:
        dev.resolve("cuda:1")
    assert ort.__version__ in str(e.value) and "--device cpu" in str(e.value)


def test_cuda_without_cupy_is_refused_and_auto_stays_on_the_cpu(monkeypatch):
    """onnxruntime-gpu alone is not enough: the decode loop's buffers live on the device in CuPy."""
    monkeypatch.setattr(dev.ort, "get_available_providers", lambda: [dev.CUDA, dev.CPU])
    monkeypatch.setattr(dev, "has_cupy", lambda: False)
    with pytest.raises(ValidationError, match=r"CuPy.*ragmix\[gpu\].*--device cpu"):
        dev.resolve("cuda:1")
    assert dev.resolve("auto") == dev.Device("cpu")
    monkeypatch.setattr(dev, "has_cupy", lambda: True)
    assert dev.resolve("cuda:1") == dev.Device("cuda", 1)
    assert dev.resolve("auto") == dev.Device("cuda", 0)


def test_a_session_left_on_the_cpu_is_refused_when_cuda_was_asked_for(tiny_encoder_dir):
    encoder = Encoder.load(tiny_encoder_dir, threads=1)
    dev.Device("cpu").check_placed(encoder.session, "encoder")
    with pytest.raises(BundleError, match="could not be placed on cuda:0"):
        dev.Device("cuda", 0).check_placed(encoder.session, "encoder")


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has the CUDA provider")
def test_serve_with_cuda_on_a_cpu_machine_stops_at_start_with_the_reason(
    tiny_generator_dir, tiny_encoder_dir, tiny_index_dir
):
    args = [
        sys.executable, "-m", "ragmix.cli", "serve", "--port", "0", "--device", "cuda",
        *("--generator", str(tiny_generator_dir), "--encoder", str(tiny_encoder_dir)),
        *("--index", str(tiny_index_dir)),
    ]  # fmt: skip
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "needs onnxruntime's CUDA execution provider" in out.stderr
