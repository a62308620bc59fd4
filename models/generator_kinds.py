"""The registry of generator kinds: which resolutions each kind trains, and how to tell them apart.

One list, read by the API schema, the CLI choices, the worker and the pipeline loader:

* ``pixel``: a UNet on the pixels (the 64 px generators; 32 and 128 kept for small and GPU runs);
* ``latent``: an ``AutoencoderKL`` (factor 4) plus a UNet on its latents, for 224-256 px images at about
  the cost of 64 px pixels (:mod:`models.diffusion.latent`).

An unknown kind or resolution fails loudly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

GeneratorKind = Literal["pixel", "latent"]

#: kind -> image resolutions (pixels, square) it trains at
GENERATOR_KINDS: dict[str, tuple[int, ...]] = {
    "pixel": (32, 64, 128),
    "latent": (224, 256),
}

#: every resolution a generator can be trained at, ascending
TRAINABLE_RESOLUTIONS: tuple[int, ...] = tuple(sorted({r for rs in GENERATOR_KINDS.values() for r in rs}))


def kind_for_resolution(resolution: int) -> str:
    """The generator kind that trains at ``resolution`` px; ``ValueError`` for any other size."""
    for kind, resolutions in GENERATOR_KINDS.items():
        if int(resolution) in resolutions:
            return kind
    raise ValueError(f"resolution {resolution} is not trainable; choose one of {list(TRAINABLE_RESOLUTIONS)} "
                     f"({', '.join(f'{k}: {list(v)}' for k, v in GENERATOR_KINDS.items())})")


def generator_kind(meta: dict[str, Any] | None = None, generator_dir: str | Path | None = None) -> str:
    """Kind of a generator from its ``cxrsynth.json`` (generators made before kinds existed are pixel)."""
    kind = str((meta or {}).get("kind") or "")
    if not kind and generator_dir is not None and (Path(generator_dir) / "vae").is_dir():
        kind = "latent"
    kind = kind or "pixel"
    if kind not in GENERATOR_KINDS:
        raise ValueError(f"unknown generator kind {kind!r}; known: {sorted(GENERATOR_KINDS)}")
    return kind


#: autoencoder steps of a latent generator when a request does not say (about 1 h on one CPU core)
DEFAULT_AUTOENCODER_STEPS = 4500


def parse_size(size: str) -> tuple[int, int]:
    """``"WxH"`` -> (W, H), the key of a dataset's ``image_sizes`` summary."""
    w, _, h = size.partition("x")
    return int(w), int(h)


def check_image_sizes(resolution: int, image_sizes: dict[str, int]) -> None:
    """Refuse a training set a ``resolution`` px generator cannot learn well from (``ValueError``).

    ``image_sizes`` counts images per ``"WxH"``. A latent generator learns its autoencoder on crops of
    images at their native size: it needs one image size across the set (one acquisition geometry:
    mixed sizes would be squashed or padded differently) and images at least ``resolution`` px on the
    short side (upscaled images would teach it blur). Pixel generators resize any image and accept all.
    """
    if kind_for_resolution(resolution) != "latent" or not image_sizes:
        return
    if len(image_sizes) > 1:
        listed = ", ".join(f"{k} ({v})" for k, v in sorted(image_sizes.items(), key=lambda kv: -kv[1])[:5])
        raise ValueError(f"a {resolution} px latent generator needs images of one size; this dataset mixes "
                         f"{len(image_sizes)} sizes: {listed}")
    w, h = parse_size(next(iter(image_sizes)))
    if min(w, h) < int(resolution):
        raise ValueError(f"the images are {w}x{h} px, smaller than the {resolution} px the generator would make "
                         f"(upscaled images teach it blur): upload larger images or train at a smaller resolution")
