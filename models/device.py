"""Device and precision selection: CUDA with bf16 autocast where present; CPU in fp32, or bf16 on request.

Inference paths call :func:`autocast_for` without a precision and keep their measured behaviour (bf16 on
CUDA, exact fp32 on CPU). Training loops that name a precision (``"auto"``) also get bf16 autocast on CPUs
with native bf16 arithmetic (AVX512-BF16 or AMX), where oneDNN runs convolutions and matmuls about 1.7x
faster than fp32 (ResNet-18 training step at 64 px on a 2-core EPYC: ``benchmarks/ssl_throughput.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import lru_cache
from typing import Literal

import torch

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[Precision, ...] = ("auto", "fp32", "bf16")


def pick_device(preference: str = "auto") -> torch.device:
    """Return the device to run on: ``auto`` picks CUDA when available, else CPU."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


@lru_cache(maxsize=1)
def cpu_bf16_supported() -> bool:
    """True when this CPU has native bf16 arithmetic (AVX512-BF16 or AMX tiles) that oneDNN uses.

    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is not enough: it is also True on AVX512F-only CPUs
    (an Intel Xeon without AVX512-BF16 here), where oneDNN emulates bf16 and sampling ran 2.3x *slower*
    than fp32. torch's own CPU feature probes (``torch.cpu._is_avx512_bf16_supported``) tell native
    support apart."""
    if not torch.backends.mkldnn.is_available():
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if all(p is None for p in probes):  # an older torch: no feature probes, so no claim of native bf16
        return False
    return any(bool(p()) for p in probes if p is not None)


def resolve_precision(precision: Precision, device: torch.device) -> Literal["fp32", "bf16"]:
    """The arithmetic a run uses: ``auto`` is bf16 on CUDA and on CPUs with native bf16, else fp32.

    ``bf16`` on a CPU without native support is refused: it would run emulated, slower than fp32.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    native = device.type == "cuda" or (device.type == "cpu" and cpu_bf16_supported())
    if precision == "bf16" and not native:
        raise ValueError(f"bf16 needs CUDA or a CPU with native bf16 (AVX512-BF16/AMX); {device} has none")
    if precision == "auto":
        return "bf16" if native else "fp32"
    return precision


@contextlib.contextmanager
def autocast_for(device: torch.device, precision: Precision | None = None) -> Iterator[None]:
    """bf16 autocast on CUDA; on CPU a no-op unless ``precision`` resolves to bf16 (see module docstring)."""
    use_bf16 = device.type == "cuda" if precision is None else resolve_precision(precision, device) == "bf16"
    if use_bf16:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    else:
        yield
