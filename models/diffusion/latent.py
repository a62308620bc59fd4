"""Latent generators: 224-256 px chest X-rays from a UNet on a 4x smaller latent grid.

Two stages, each resumable on its own, as in Stable Diffusion / RoentGen / Cheff:

1. an ``AutoencoderKL`` trained on random crops of the full-size images
   (:mod:`models.diffusion.autoencoder`); its latent statistics become ``shift_factor`` /
   ``scaling_factor``;
2. the class-conditional ``UNet2DModel`` of the pixel generators (v-prediction, classifier-free
   guidance, EMA, warm start) trained on the latents, encoded once and held in RAM as fp16
   (5,016 x 4 x 56 x 56 is 126 MB).

The export is a diffusers folder of components (``unet/``, ``vae/``, ``scheduler/``) beside the same
``cxrsynth.json``, index, privacy gate and card as a pixel generator, so
``AutoencoderKL.from_pretrained(dir, subfolder="vae")`` and ``UNet2DModel.from_pretrained(dir,
subfolder="unet")`` load it without this project. Checkpoint layout under ``checkpoint_dir``::

    autoencoder/checkpoint.pt   stage 1 state (while it trains)
    vae/                        stage 1 result (weights + latent statistics + held-out metrics)
    unet/checkpoint.pt          stage 2 state
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from models.callbacks import OnStep, no_progress
from models.checkpoints import CHECKPOINT_NAME, atomic_directory
from models.device import pick_device
from models.diffusion.autoencoder import (
    AUTOENCODER_JSON,
    AutoencoderConfig,
    AutoencoderResult,
    encode_latents,
    finetune_decoder,
    holdout_split,
    load_vae,
    save_vae,
    set_latent_statistics,
    train_autoencoder,
    vae_from_checkpoint,
)
from models.diffusion.config import TrainingConfig
from models.diffusion.training import TrainingData, TrainingResult, load_training_data, train_generator
from models.distributed import broadcast_from_main, world
from models.generator_kinds import GENERATOR_KINDS


@dataclass(frozen=True)
class LatentGeneratorConfig:
    """The two stages' configs; the UNet's ``resolution`` is the latent side, its channels the latents'."""

    autoencoder: AutoencoderConfig
    unet: TrainingConfig

    def __post_init__(self) -> None:
        ae, un = self.autoencoder, self.unet
        if un.resolution != ae.latent_size or un.in_channels != ae.latent_channels:
            raise ValueError(f"the UNet must denoise {ae.latent_channels}x{ae.latent_size}x{ae.latent_size} latents, "
                             f"got {un.in_channels}x{un.resolution}x{un.resolution}")
        if un.clip_sample:
            raise ValueError("clip_sample must be False for latents (unit variance, not bounded to [-1, 1])")

    @property
    def resolution(self) -> int:
        """Image side in pixels."""
        return self.autoencoder.resolution

    @classmethod
    def for_resolution(cls, resolution: int = 224, *, autoencoder: dict[str, Any] | None = None,
                       **unet: Any) -> LatentGeneratorConfig:
        """Defaults for a 224 or 256 px generator; ``autoencoder`` and ``unet`` override fields.

        UNet: the 64 px pixel generator's shape (16, 32, 64, 128), measured on the 2-core CPU at 0.68x
        its step time on 4 x 56 x 56 latents; a wider first level (32, ...) cost 2.8x.
        """
        if int(resolution) not in GENERATOR_KINDS["latent"]:
            raise ValueError(f"latent generators train at {list(GENERATOR_KINDS['latent'])} px, not {resolution}")
        ae = AutoencoderConfig(resolution=int(resolution), block_out_channels=(16, 32, 64), norm_num_groups=16)
        if autoencoder:
            ae = ae.replace(**autoencoder)
        fields: dict[str, Any] = dict(resolution=ae.latent_size, in_channels=ae.latent_channels, clip_sample=False,
                                      block_out_channels=(16, 32, 64, 128), batch_size=16, learning_rate=3e-4)
        fields.update(unet)
        return cls(ae, TrainingConfig(**fields))

    @classmethod
    def tiny(cls, *, autoencoder: dict[str, Any] | None = None, **unet: Any) -> LatentGeneratorConfig:
        """A tiny 64 px latent generator (16 px latents) that trains in seconds, for tests."""
        ae = AutoencoderConfig.tiny(**(autoencoder or {}))
        fields: dict[str, Any] = dict(resolution=ae.latent_size, in_channels=ae.latent_channels, clip_sample=False)
        fields.update(unet)
        return cls(ae, TrainingConfig.tiny(**fields))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of both stages."""
        return {"autoencoder": self.autoencoder.to_dict(), "unet": self.unet.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatentGeneratorConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(AutoencoderConfig.from_dict(d["autoencoder"]), TrainingConfig.from_dict(d["unet"]))

    def replace(self, autoencoder: dict[str, Any] | None = None, **unet: Any) -> LatentGeneratorConfig:
        """A copy with fields of either stage changed."""
        return dataclasses.replace(self, autoencoder=self.autoencoder.replace(**(autoencoder or {})),
                                   unet=self.unet.replace(**unet))


def scaled_latents(vae: Any, images_u8: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """(N, C, r, r) fp16 latents ``(mode - shift) * scale``: what the UNet learns and the pipeline decodes."""
    raw = encode_latents(vae, images_u8, device=device)
    shift = float(vae.config.get("shift_factor") or 0.0)
    return ((raw - shift) * float(vae.config["scaling_factor"])).to(torch.float16)


def _stage_offset(on_step: OnStep, offset: int, whole: int, stage: str) -> OnStep:
    """Progress of one stage as steps of the whole job, the message prefixed by the stage's name."""

    def report(step: int, total: int, message: str) -> None:
        on_step(offset + step, whole, f"{stage}: {message}")

    return report


def _autoencoder_stage(
    td: TrainingData, config: LatentGeneratorConfig, ckpt: Path | None, resume: bool, on_step: OnStep,
    device: str,
) -> tuple[Any, dict[str, Any]]:
    """Stage 1: train (or resume, or reload the finished) autoencoder; returns it and its record."""
    done = ckpt / "vae" if ckpt is not None else None
    if resume and done is not None and (done / AUTOENCODER_JSON).is_file():
        return load_vae(done), json.loads((done / AUTOENCODER_JSON).read_text())
    ae = config.autoencoder
    ae_ckpt = ckpt / "autoencoder" if ckpt is not None else None
    dec_ckpt = ckpt / "decoder" if ckpt is not None else None
    resume_dec = resume and dec_ckpt is not None and (dec_ckpt / CHECKPOINT_NAME).is_file()
    if resume_dec:  # the main phase finished: its weights are in the decoder checkpoint (encoder frozen there)
        assert ae_ckpt is not None
        vae, _, state = vae_from_checkpoint(ae_ckpt)
        result = AutoencoderResult(vae, int(state["step"]), float(state["wall_seconds"]), device)
        train_idx, _ = holdout_split(len(td.images), td.patient_ids, ae.holdout_fraction, ae.seed)
        set_latent_statistics(result.vae, td.images[train_idx][: ae.scale_images], device=device)
    else:
        resume_ae = resume and ae_ckpt is not None and (ae_ckpt / CHECKPOINT_NAME).is_file()
        result = train_autoencoder(td.images, ae, ae_ckpt, resume_ae, on_step, patient_ids=td.patient_ids,
                                   device=device, evaluate=ae.decoder_steps == 0)
    info: dict[str, Any] = {"steps": result.steps, "wall_seconds": round(result.wall_seconds, 1),
                            "device": result.device, "heldout": result.metrics, "source": td.source}
    if ae.decoder_steps:
        dec = finetune_decoder(result.vae, td.images, ae, dec_ckpt, resume_dec,
                               _stage_offset(on_step, ae.max_steps, ae.max_steps + ae.decoder_steps, "decoder"),
                               patient_ids=td.patient_ids, device=device)
        result.vae = dec.vae
        info.update(decoder_steps=dec.steps, decoder_wall_seconds=round(dec.wall_seconds, 1), heldout=dec.metrics)
    if done is not None:
        with atomic_directory(done) as tmp:
            save_vae(result.vae, tmp, config.autoencoder.replace(export_fp16=False), info)
        return load_vae(done), {"config": config.autoencoder.to_dict(), **info}
    return result.vae.float().eval(), {"config": config.autoencoder.to_dict(), **info}


def _distributed_autoencoder_stage(
    td: TrainingData, config: LatentGeneratorConfig, ckpt: Path | None, resume: bool, on_step: OnStep,
    device: str,
) -> tuple[Any, dict[str, Any]]:
    """Stage 1 in a run of one or more processes; returns the autoencoder and its record on every rank.

    Stage 1 is not data-parallel yet (its adversarial decoder phase trains two networks): in a
    distributed run rank 0 trains it while the other ranks wait for its ``vae`` folder in the shared
    checkpoint folder, by polling the file system rather than in a collective, whose timeout a
    long stage would exceed. The ready marker names a token of this run, so a folder left by an
    earlier run is never taken. Without a checkpoint folder every rank trains the same stage itself.
    """
    w = world()
    if not w.distributed or ckpt is None:
        return _autoencoder_stage(td, config, ckpt, resume, on_step, device)
    token = broadcast_from_main(uuid.uuid4().hex, w)
    ready = ckpt / f".vae-ready-{token}"
    if w.main:
        vae, info = _autoencoder_stage(td, config, ckpt, resume, on_step, device)
        ready.touch()
        return vae, info
    while not ready.exists():
        time.sleep(2.0)
    done = ckpt / "vae"
    return load_vae(done), json.loads((done / AUTOENCODER_JSON).read_text())


def train_latent_generator(
    data: str | Path | TrainingData,
    out_dir: str | Path | None,
    config: LatentGeneratorConfig,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    on_step: OnStep = no_progress,
    *,
    device: str = "auto",
    init_from: str | Path | None = None,
    sample_grid: bool = True,
    preview_dir: str | Path | None = None,
    preview_every: int = 0,
) -> TrainingResult:
    """Train both stages and export a latent generator to ``out_dir``.

    ``data`` is an ImageFolder (class-conditional) or loose images, read at ``config.resolution``.
    ``resume`` continues whichever stage was interrupted. ``init_from`` (a latent generator folder)
    skips stage 1 by reusing that generator's autoencoder, so its latents mean the same, and warm-starts
    the UNet from its weights. Progress counts the steps of both stages, messages name the stage.
    """
    td = data if isinstance(data, TrainingData) else load_training_data(data, config.resolution)
    if td.images.shape[1] != config.resolution:
        raise ValueError(f"images are {td.images.shape[1]} px; this latent generator makes {config.resolution} px")
    if td.images.shape[0] < 2:
        raise ValueError("a latent generator needs at least 2 training images")
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    dev = pick_device(device)
    reuse = init_from is not None and (Path(init_from) / "vae").is_dir()
    ae_steps = 0 if reuse else config.autoencoder.max_steps + config.autoencoder.decoder_steps
    total = ae_steps + config.unet.max_steps
    if reuse:
        assert init_from is not None
        vae = load_vae(Path(init_from) / "vae")
        info = json.loads((Path(init_from) / "vae" / AUTOENCODER_JSON).read_text())
        info["reused_from"] = str(Path(init_from).name)
    else:
        vae, info = _distributed_autoencoder_stage(td, config, ckpt, resume,
                                                   _stage_offset(on_step, 0, total, "autoencoder"), str(dev))
    vae = cast(Any, vae).to(dev)
    on_step(ae_steps, total, "encoding the training images")
    t0 = time.perf_counter()
    latents = scaled_latents(vae, td.images, device=dev)
    info["latents"] = {"shape": list(latents.shape[1:]), "encode_seconds": round(time.perf_counter() - t0, 1)}
    unet_ckpt = ckpt / "unet" if ckpt is not None else None
    resume_unet = resume and unet_ckpt is not None and (unet_ckpt / CHECKPOINT_NAME).is_file()
    return train_generator(
        td, out_dir, config.unet, unet_ckpt, resume_unet, _stage_offset(on_step, ae_steps, total, "diffusion"),
        device=str(dev), init_from=init_from if not resume_unet else None, sample_grid=sample_grid,
        preview_dir=preview_dir, preview_every=preview_every, latents=latents, vae=vae, autoencoder_info=info,
    )


def replace_decoder(generator_dir: str | Path, vae_dir: str | Path, notes: str = "") -> Path:
    """Swap a latent generator's autoencoder for one with the same encoder and a fine-tuned decoder.

    What Stable Diffusion did with its ft-MSE / ft-EMA decoders: the encoder (hence the latents, their
    statistics and the UNet trained on them) is unchanged, only the decoding improves. Refuses an
    autoencoder whose encoder or latent statistics differ. Updates ``cxrsynth.json`` and the card.
    """
    from models.diffusion.export import read_generator_metadata, write_model_card

    gen, new_dir = Path(generator_dir), Path(vae_dir)
    old, new = load_vae(gen / "vae"), load_vae(new_dir)
    a, b = old.state_dict(), new.state_dict()
    frozen = [k for k in a if k.startswith(("encoder.", "quant_conv."))]
    if set(a) != set(b) or any(not torch.equal(a[k], b[k]) for k in frozen):
        raise ValueError(f"{new_dir} has another encoder than {gen}: its latents would mean something else")
    for key in ("scaling_factor", "shift_factor"):
        if float(old.config[key] or 0.0) != float(new.config[key] or 0.0):
            raise ValueError(f"{new_dir} has another latent {key} than {gen}")
    info = json.loads((new_dir / AUTOENCODER_JSON).read_text())
    meta = read_generator_metadata(gen)
    with atomic_directory(gen / "vae") as tmp:
        for f in new_dir.iterdir():
            (tmp / f.name).write_bytes(f.read_bytes())
    meta["autoencoder"].update({k: v for k, v in info.items() if k != "config"})
    (gen / "cxrsynth.json").write_text(json.dumps(meta, indent=2) + "\n")
    write_model_card(gen, notes)
    return gen


def main(argv: list[str] | None = None) -> None:
    """Command line: ``python -m models.diffusion.latent --data DIR --out DIR [--resume]`` (logs to stdout)."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--data", required=True, help="ImageFolder (class-conditional) or folder of images")
    ap.add_argument("--out", required=True, help="generator directory to export to")
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--checkpoint-dir", default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--config", default=None, help='JSON {"autoencoder": {...}, "unet": {...}} of overrides')
    ap.add_argument("--init-from", default=None, help="latent generator to reuse the autoencoder of and warm-start")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    over: dict[str, Any] = {}
    if args.config:
        over = json.loads(Path(args.config).read_text() if Path(args.config).is_file() else args.config)
    config = LatentGeneratorConfig.for_resolution(args.resolution, autoencoder=over.get("autoencoder"),
                                                  **over.get("unet", {}))
    last = [time.perf_counter(), 0]

    def log(step: int, total: int, message: str) -> None:
        if step % args.log_every == 0 or step == total or "encoding" in message:
            now = time.perf_counter()
            rate = (now - last[0]) / max(1, step - last[1])
            last[0], last[1] = now, step
            print(f"{time.strftime('%H:%M:%S')} step {step}/{total} {message} {rate:.2f} s/step "
                  f"eta {rate * (total - step) / 60:.1f} min", flush=True)

    result = train_latent_generator(args.data, args.out, config, args.checkpoint_dir, args.resume, log,
                                    device=args.device, init_from=args.init_from)
    print(f"done: {result.steps} UNet steps, final loss {result.final_loss:.4f}, {result.wall_seconds:.0f} s, "
          f"exported to {result.out_dir}", flush=True)


if __name__ == "__main__":
    main()
