"""Device and precision selection: CUDA with bf16 autocast where present, else CPU in fp32."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def pick_device(preference: str = "auto") -> torch.device:
    """Return the device to run on: ``auto`` picks CUDA when available, else CPU."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preference)


@contextlib.contextmanager
def autocast_for(device: torch.device) -> Iterator[None]:
    """bf16 autocast on CUDA (Ampere and newer), a no-op on CPU where fp32 is faster and exact."""
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            yield
    else:
        yield
