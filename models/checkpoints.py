"""Training-state files shared by every resumable loop (generator training, SSL pretraining)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint_atomic(payload: dict[str, Any], checkpoint_dir: str | Path) -> Path:
    """Write ``checkpoint.pt`` via a temporary file, fsync and ``os.replace`` (never half-written)."""
    d = Path(checkpoint_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = d / CHECKPOINT_NAME
    tmp = d / f".{CHECKPOINT_NAME}.tmp-{os.getpid()}"
    torch.save(payload, tmp)
    with open(tmp, "rb") as fh:  # flush to disk before the rename makes it visible
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    return final


def read_checkpoint(checkpoint_dir: str | Path) -> dict[str, Any]:
    """Load ``checkpoint.pt`` to CPU; ``FileNotFoundError`` when there is none."""
    path = Path(checkpoint_dir) / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    # weights_only=False: the checkpoint holds numpy / python RNG states, and it is our own file.
    state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=False)
    return state
