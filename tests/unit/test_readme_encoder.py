"""The README's plain-timm snippet loads an exported encoder (fp32 and fp16) and gives the features that
``models.ssl.load_encoder`` gives; the API's copy of the encoder format matches the library's."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import timm
import torch

from app.core.config import REPO_ROOT
from app.services.ssl_jobs import ENCODER_FORMAT
from models.ssl import export_encoder, load_encoder
from models.ssl.backbones import backbone_kwargs
from models.ssl.export import FORMAT

README = (REPO_ROOT / "README.md").read_text()
THIN = {"channels": (8, 16, 32, 64), "stem_width": 8}


def snippet() -> str:
    block = re.search(r"<!-- timm-snippet:start.*?-->\s*```python\n(.*?)```\s*<!-- timm-snippet:end -->", README,
                      flags=re.DOTALL)
    assert block, "README lost its timm snippet (between the timm-snippet markers)"
    return block.group(1)


@pytest.mark.parametrize("fp16", [False, True])
def test_readme_snippet_loads_an_export_with_plain_timm(tmp_path: Path, fp16: bool) -> None:
    torch.manual_seed(0)
    kwargs = backbone_kwargs("resnet18", 32, THIN)
    encoder = timm.create_model("resnet18", in_chans=1, num_classes=0, pretrained=False, **kwargs)
    out = export_encoder(tmp_path / "enc", encoder, model_name="resnet18", timm_kwargs=kwargs, resolution=32,
                         mean=0.5, std=0.25, method="dino", pretraining={"steps": 0}, fp16=fp16)
    code, n = re.subn(r"^encoder_dir = .*$", f"encoder_dir = {str(out)!r}", snippet(), flags=re.MULTILINE)
    assert n == 1 and "cxrsynth" not in code.replace("cxrsynth exported", "")  # plain timm, no project import
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    features = namespace["features"]
    assert features.shape == (4, 64)
    with torch.no_grad():
        expected = load_encoder(out)(namespace["x"])
    torch.testing.assert_close(features, expected)
    if not fp16:  # the fp32 export is bit-exact to the encoder that was exported
        with torch.no_grad():
            torch.testing.assert_close(features, encoder.eval()(namespace["x"]))


def test_api_knows_the_encoder_format() -> None:
    assert ENCODER_FORMAT == FORMAT
