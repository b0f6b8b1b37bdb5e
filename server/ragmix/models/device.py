"""Where the ONNX sessions run: `--device auto|cpu|cuda[:N]`, resolved once at start.

auto is CUDA when this onnxruntime build has the CUDA execution provider and CuPy (which holds the
decode loop's buffers on the device) is installed, else the CPU; asking for cuda where either is
missing is refused at start with what is installed and what to install, rather than left to
onnxruntime's silent fallback to the CPU.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from typing import Any

import onnxruntime as ort

from ragmix.errors import BundleError, ValidationError

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_SPEC = re.compile(r"(auto|cpu|cuda)(?::(\d{1,3}))?")


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" or "cuda"
    index: int = 0

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"

    def providers(self) -> list[Any]:
        """onnxruntime providers, in order of preference (the CPU runs what CUDA cannot)."""
        if self.kind == "cpu":
            return [CPU]
        return [(CUDA, {"device_id": self.index}), CPU]

    def check_placed(self, session: ort.InferenceSession, what: str) -> None:
        """Refuse a session onnxruntime quietly placed on the CPU although CUDA was asked for
        (no visible device, a driver or CUDA library it could not load)."""
        if self.kind == "cuda" and CUDA not in session.get_providers():
            raise BundleError(
                f"the {what} could not be placed on {self}: onnxruntime fell back to "
                f"{session.get_providers()} (no visible CUDA device, or its CUDA libraries did not "
                "load; its log above says which). Serve with --device cpu, or fix the CUDA set-up."
            )


def parse(text: str) -> tuple[str, int | None]:
    m = _SPEC.fullmatch(text.strip().lower())
    if m is None or (m[1] != "cuda" and m[2] is not None):
        raise ValidationError("device", f"device must be auto, cpu, cuda or cuda:N, got {text!r}.")
    return m[1], None if m[2] is None else int(m[2])


def resolve(text: str) -> Device:
    """The device `text` names on this machine (ValidationError when it cannot be had)."""
    kind, index = parse(text)
    available = ort.get_available_providers()
    cupy = has_cupy()
    if kind == "cpu" or (kind == "auto" and (CUDA not in available or not cupy)):
        return Device("cpu")
    if CUDA not in available:
        raise ValidationError(
            "device",
            f"device {text} needs onnxruntime's CUDA execution provider, but onnxruntime "
            f"{ort.__version__} here has only {available}; install ragmix[gpu] (onnxruntime-gpu) "
            "or serve with --device cpu.",
        )
    if not cupy:
        raise ValidationError(
            "device",
            f"device {text} keeps the KV cache and logits on the GPU with CuPy, which is not "
            "installed; install ragmix[gpu] (cupy-cuda13x) or serve with --device cpu.",
        )
    return Device("cuda", index or 0)


def has_cupy() -> bool:
    """Whether CuPy is installed (looked up, not imported: the CPU path never loads it)."""
    return importlib.util.find_spec("cupy") is not None
