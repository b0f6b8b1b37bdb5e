"""Where the decode loop's buffers live: numpy arrays on the CPU, CuPy arrays on a CUDA device.

The KV cache of the running batch and the logits of a decode pass are allocated by the array
module of the generator's device and bound to onnxruntime by pointer (IO binding), so on a GPU they
never leave it: the mixture kernel reads the logits where the graph wrote them, and only the chosen
tokens and the K responsibilities come back. Host arrays handed to device code (a prompt's KV from
a prefill pass, its first logits) are copied up once; device arrays that host code must read (beam
search's log-softmax, a probe's logits) come down through `to_host`, which counts, so a test or
benchmarks/gpu_check.sh can show a RAG-Token step makes no such copy.
"""

from __future__ import annotations

import threading
from types import ModuleType
from typing import Any

import numpy as np

_COPIES = {"to_host": 0}
_LOCK = threading.Lock()


def module_for(kind: str) -> ModuleType:
    """numpy for "cpu", CuPy for "cuda" (ragmix[gpu] installs it)."""
    if kind == "cpu":
        return np
    try:
        import cupy
    except ImportError as e:
        raise RuntimeError(
            f"the CUDA decode path keeps its buffers on the device with CuPy, which is not "
            f"installed ({e}): `pip install ragmix[gpu]`, or serve with --device cpu."
        ) from e
    return cupy


def module_of(array: Any) -> ModuleType:
    """The array module `array` belongs to (numpy for anything that is not a CuPy array)."""
    if isinstance(array, np.ndarray):
        return np
    kind = type(array).__module__.split(".")[0]
    return module_for("cuda") if kind == "cupy" else np


def on_device(array: Any) -> bool:
    return not isinstance(array, np.ndarray) and hasattr(array, "__cuda_array_interface__")


def location(array: Any) -> tuple[str, int, int]:
    """(onnxruntime device name, device id, data pointer) for binding `array` by pointer."""
    if on_device(array):
        return "cuda", int(array.device.id), int(array.data.ptr)
    return "cpu", 0, int(array.ctypes.data)


def like(reference: Any, array: Any) -> Any:
    """`array` in the memory `reference` lives in (a copy up to the device where needed)."""
    return module_of(reference).asarray(array)


def to_host(array: Any) -> np.ndarray:
    """A numpy array of `array`: itself on the CPU, a counted copy from a device."""
    if not on_device(array):
        return array
    with _LOCK:
        _COPIES["to_host"] += 1
    return array.get()


def host_copies() -> int:
    """Device-to-host copies of step buffers `to_host` made since the process started."""
    return _COPIES["to_host"]
