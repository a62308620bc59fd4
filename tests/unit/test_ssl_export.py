"""Encoder export: safetensors + config.json + model card, loadable with plain timm to identical features."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from safetensors.torch import load_file

from models.ssl import PretrainConfig, create_backbone, export_encoder, load_encoder, pretrain, read_encoder_config
from models.ssl.backbones import backbone_kwargs

torch.set_num_threads(1)

TINY_RESNET = {"channels": (8, 16, 32, 64), "stem_width": 8}


def _export(tmp_path: Path, name: str, kwargs: dict[str, Any], fp16: bool = False) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    backbone = create_backbone(name, 32, kwargs)
    with torch.no_grad():  # non-trivial batch-norm statistics, so buffers are checked too
        for m in backbone.modules():
            if isinstance(m, torch.nn.BatchNorm2d) and m.running_mean is not None and m.running_var is not None:
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    out = export_encoder(
        tmp_path / name, backbone, model_name=name, timm_kwargs=backbone_kwargs(name, 32, kwargs), resolution=32,
        mean=0.5, std=0.25, method="dino", fp16=fp16,
        pretraining={"data": {"source": "unit-test", "num_images": 3, "counts": {"unlabelled": 3}}, "steps": 1},
    )
    return backbone.eval(), out


@pytest.mark.parametrize(("name", "kwargs"), [("resnet18", TINY_RESNET), ("test_vit", {})])
def test_plain_timm_load_gives_identical_features(tmp_path: Path, name: str, kwargs: dict[str, Any]) -> None:
    backbone, out = _export(tmp_path, name, kwargs)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == name and cfg["in_chans"] == 1 and cfg["num_classes"] == 0
    assert cfg["input_size"] == [1, 32, 32] and cfg["mean"] == [0.5] and cfg["std"] == [0.25]
    assert cfg["method"] == "dino" and cfg["pretraining"]["data"]["source"] == "unit-test"
    if name == "test_vit":
        assert cfg["timm_kwargs"]["img_size"] == 32  # the ViT's positional embedding follows the resolution
    # Plain timm, nothing from this project:
    plain = timm.create_model(cfg["architecture"], in_chans=1, num_classes=0, pretrained=False, **cfg["timm_kwargs"])
    plain.load_state_dict(load_file(str(out / "model.safetensors")))
    plain.eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        expected = backbone(x)
        assert torch.equal(plain(x), expected)
        assert torch.equal(load_encoder(out)(x), expected)
    assert read_encoder_config(out)["num_features"] == expected.shape[1]


def test_fp16_export_is_half_the_size_and_close(tmp_path: Path) -> None:
    backbone, out32 = _export(tmp_path / "a", "resnet18", TINY_RESNET)
    _, out16 = _export(tmp_path / "b", "resnet18", TINY_RESNET, fp16=True)
    assert json.loads((out16 / "config.json").read_text())["weights_dtype"] == "float16"
    assert (out16 / "model.safetensors").stat().st_size < 0.6 * (out32 / "model.safetensors").stat().st_size
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(load_encoder(out16)(x), backbone(x), atol=2e-2, rtol=2e-2)


def test_model_card_snippet_runs(tmp_path: Path) -> None:
    result = pretrain(
        torch.randint(0, 256, (8, 32, 32), dtype=torch.uint8).numpy(),
        PretrainConfig.tiny(method="dino", max_steps=1), tmp_path / "enc", device="cpu",
    )
    assert result.out_dir is not None
    card = (result.out_dir / "README.md").read_text()
    assert "Kermany" in card and "CC BY 4.0" in card and "no horizontal flip" in card
    snippet = re.search(r"```python\n(.*?)```", card, re.S)
    assert snippet is not None
    code = snippet.group(1).replace('"path/to/this/folder"', repr(str(result.out_dir)))
    assert "cxrsynth" not in code and "models." not in code  # plain timm + safetensors only
    scope: dict[str, Any] = {}
    exec(compile(code, "model-card-snippet", "exec"), scope)
    assert scope["features"].shape == (2, scope["cfg"]["num_features"])
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(scope["model"](x), load_encoder(result.out_dir)(x))


def test_bad_encoder_directories(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not an encoder directory"):
        load_encoder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="unsupported format"):
        load_encoder(tmp_path)
    with pytest.raises(ValueError, match="unknown timm model"):
        create_backbone("no_such_model_xyz", 32)
