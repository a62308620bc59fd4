"""Device and precision choice: ``auto`` must never pick emulated bf16 on a CPU (slower than fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.device import autocast_for, cpu_bf16_supported, resolve_precision

CPUINFO = Path("/proc/cpuinfo")


@pytest.mark.skipif(not CPUINFO.is_file(), reason="reads the CPU flags from /proc/cpuinfo (Linux)")
def test_native_bf16_matches_the_cpu_flags() -> None:
    """True exactly when the CPU advertises AVX512-BF16 or AMX-BF16. oneDNN's own probe also says True on
    AVX512F-only CPUs, where bf16 runs emulated: sampling measured 2.3x slower than fp32 on such a Xeon."""
    flags = set()
    for line in CPUINFO.read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    native = bool({"avx512_bf16", "amx_bf16"} & flags)
    assert cpu_bf16_supported() is (native and torch.backends.mkldnn.is_available())


def test_auto_precision_follows_native_support() -> None:
    cpu = torch.device("cpu")
    expected = "bf16" if cpu_bf16_supported() else "fp32"
    assert resolve_precision("auto", cpu) == expected
    assert resolve_precision("fp32", cpu) == "fp32"
    if not cpu_bf16_supported():
        with pytest.raises(ValueError, match="native bf16"):
            resolve_precision("bf16", cpu)
    with autocast_for(cpu, "auto"):
        y = torch.nn.functional.linear(torch.ones(2, 4), torch.ones(3, 4))
    assert y.dtype == (torch.bfloat16 if expected == "bf16" else torch.float32)
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("fp16", cpu)  # type: ignore[arg-type]
