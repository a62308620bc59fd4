"""Export of a pretrained encoder that plain timm can load, and the loader that proves it.

An encoder directory holds::

    model.safetensors   the backbone's state dict (timm names; fp32, or fp16 when asked)
    config.json         timm model name + kwargs, in_chans, input size, normalisation, provenance
    README.md           model card, with the few lines of plain timm that load it

:func:`load_encoder` uses nothing but ``timm.create_model(..., pretrained=False)`` and
``load_state_dict``: the same code a hospital would run without this project.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.checkpoints import atomic_directory
from models.provenance import DATA_SOURCES

FORMAT = "cxrsynth-encoder/1"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"



def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def encoder_config(
    *,
    model_name: str,
    timm_kwargs: Mapping[str, Any],
    num_features: int,
    resolution: int,
    aspect_mode: str,
    mean: float,
    std: float,
    weights_dtype: str,
    method: str,
    pretraining: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``config.json`` of an encoder directory."""
    return {
        "format": FORMAT,
        "architecture": model_name,
        "timm_kwargs": _jsonable(dict(timm_kwargs)),
        "in_chans": 1,
        "num_classes": 0,
        "num_features": int(num_features),
        "input_size": [1, resolution, resolution],
        "resolution": resolution,
        "aspect_mode": aspect_mode,
        "mean": [float(mean)],
        "std": [float(std)],
        "normalisation": "x = (pixels / 255 - mean) / std on one grey channel",
        "weights_dtype": weights_dtype,
        "method": method,
        "pretraining": _jsonable(dict(pretraining)),
    }


def export_encoder(
    out_dir: str | Path,
    encoder: nn.Module,
    *,
    model_name: str,
    timm_kwargs: Mapping[str, Any],
    resolution: int,
    mean: float,
    std: float,
    method: str,
    pretraining: Mapping[str, Any],
    aspect_mode: str = "pad",
    fp16: bool = False,
    notes: str = "",
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` + ``README.md`` (built in a temp dir, then moved).

    ``pretraining`` describes the run (data summary, steps, config, device) for the model card.
    """
    out = Path(out_dir)
    dtype = torch.float16 if fp16 else torch.float32
    state = {
        k: (v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
        for k, v in encoder.state_dict().items()
    }
    cfg = encoder_config(
        model_name=model_name, timm_kwargs=timm_kwargs, num_features=int(encoder.num_features),  # type: ignore[arg-type]
        resolution=resolution, aspect_mode=aspect_mode, mean=mean, std=std,
        weights_dtype=str(dtype).removeprefix("torch."), method=method, pretraining=pretraining,
    )
    with atomic_directory(out) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT, "architecture": model_name})
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(cfg, notes=notes))
    return out


def read_encoder_config(encoder_dir: str | Path) -> dict[str, Any]:
    """Read and check ``config.json`` of an encoder directory."""
    path = Path(encoder_dir) / CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{encoder_dir} is not an encoder directory (no {CONFIG})")
    cfg: dict[str, Any] = json.loads(path.read_text())
    if cfg.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported format {cfg.get('format')!r}, expected {FORMAT!r}")
    return cfg


def load_encoder(encoder_dir: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild an exported encoder with plain timm and load its weights (fp32, eval mode).

    Exactly the snippet of the model card: ``timm.create_model(name, in_chans=1, num_classes=0,
    pretrained=False, **timm_kwargs)`` then ``load_state_dict`` (strict: every key must match).
    """
    cfg = read_encoder_config(encoder_dir)
    model = timm.create_model(
        cfg["architecture"], in_chans=1, num_classes=0, pretrained=False, **cfg["timm_kwargs"]
    )
    model.load_state_dict(load_file(str(Path(encoder_dir) / WEIGHTS)))  # fp16 files are upcast on copy
    return model.to(device).eval()


def model_card(cfg: Mapping[str, Any], notes: str = "") -> str:
    """Markdown model card of an encoder from its ``config.json``."""
    pre = cfg.get("pretraining", {})
    data = pre.get("data", {})
    counts = ", ".join(f"{k}: {v:,}" for k, v in data.get("counts", {}).items())
    counts = f" ({counts})" if counts else ""
    r = cfg["resolution"]
    method = {"dino": "DINO (self-distillation, momentum teacher; the exported weights are the teacher's)",
              "simclr": "SimCLR (NT-Xent contrastive loss)"}.get(cfg["method"], cfg["method"])
    kwargs = ", ".join(f"{k}={v!r}" for k, v in cfg["timm_kwargs"].items())
    notes_block = f"\n## Notes\n{notes}\n" if notes else ""
    return f"""# cxrsynth encoder: {cfg['architecture']}, {cfg['method']}, {r} px

Self-supervised image encoder for grey-scale chest X-rays ({r}x{r}, one channel), returning
{cfg['num_features']}-d pooled features. Meant as the backbone of pneumonia classifiers and lung
segmentation models fine-tuned on a hospital's own labelled images.

## Load it with plain timm
```python
import json

import timm
import torch
from safetensors.torch import load_file

encoder_dir = "path/to/this/folder"
cfg = json.load(open(f"{{encoder_dir}}/config.json"))
model = timm.create_model(cfg["architecture"], in_chans=1, num_classes=0, pretrained=False, **cfg["timm_kwargs"])
model.load_state_dict(load_file(f"{{encoder_dir}}/model.safetensors"))
model.eval()

pixels = torch.rand(2, 1, {r}, {r})  # grey images scaled to [0, 1], resized to {r}x{r}
x = (pixels - cfg["mean"][0]) / cfg["std"][0]
with torch.no_grad():
    features = model(x)  # (2, {cfg['num_features']})
```

## Model
- timm `{cfg['architecture']}`, `in_chans=1`, `num_classes=0`{', ' + kwargs if kwargs else ''}; weights
  {cfg['weights_dtype']}.
- Input: {r}x{r} grey images, aspect ratio `{cfg['aspect_mode']}`, normalised as {cfg['normalisation']}
  with mean {cfg['mean'][0]} and std {cfg['std'][0]}.

## Pretraining
- Method: {method}.
- Data: `{data.get('source', 'unknown')}`, {data.get('num_images', 0):,} images{counts}. No labels were used.
- {pre.get('steps', 0):,} steps at batch {pre.get('batch_size', '?')}; wall time {pre.get('wall_seconds', 0):,.0f} s on
  {pre.get('device', 'unknown device')}.
- Augmentations (kornia, on device): random resized crop, rotation <= 10 degrees, brightness / contrast /
  gamma, Gaussian blur, solarize (DINO); no colour jitter (grey images) and no horizontal flip
  (chest anatomy is not mirror-symmetric).
{notes_block}
## Intended use and limits
Research and development of chest X-ray models; not a medical device. Evaluate on your own data
before any use (`cxrsynth evaluate classification|segmentation --encoder <this folder>`).

## Data sources and licences
Weights trained on these images, or on synthetic images from a generator trained on them, are a
derived work of these CC BY 4.0 data sets:

{DATA_SOURCES}
"""
