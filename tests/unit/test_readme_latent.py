"""The README's plain-diffusers snippet samples a latent generator component by component, with no
cxrsynth code, and gives full-size images."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch

from app.core.config import REPO_ROOT
from models.diffusion.testing import train_tiny_latent_generator

README = (REPO_ROOT / "README.md").read_text()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def snippet() -> str:
    block = re.search(r"<!-- diffusers-snippet:start.*?-->\s*```python\n(.*?)```\s*<!-- diffusers-snippet:end -->",
                      README, flags=re.DOTALL)
    assert block, "README lost its diffusers snippet (between the diffusers-snippet markers)"
    return block.group(1)


def test_readme_snippet_samples_a_latent_generator_with_plain_diffusers(tmp_path: Path) -> None:
    out, _ = train_tiny_latent_generator(tmp_path / "gen")
    code, n = re.subn(r"^generator_dir = .*$", f"generator_dir = {str(out)!r}", snippet(), flags=re.MULTILINE)
    assert n == 1 and "cxrsynth" not in code.split("#")[0] and "from models" not in code
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    images = namespace["images"]
    assert images.shape == (2, 1, 64, 64) and images.dtype == torch.uint8
    assert int(images.max()) > int(images.min())  # decoded pictures, not a constant
