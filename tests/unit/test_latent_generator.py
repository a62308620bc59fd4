"""Latent generators (models.diffusion.autoencoder / latent): two resumable stages, a diffusers export
that plain diffusers loads component by component, and the pipeline's determinism contract."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

from models.callbacks import Canceled
from models.checkpoints import read_checkpoint
from models.diffusion import CXRDiffusionPipeline, read_generator_metadata
from models.diffusion.autoencoder import (
    AutoencoderConfig,
    bicubic_round_trip,
    holdout_split,
    load_vae,
    reconstruction_metrics,
    train_autoencoder,
)
from models.diffusion.latent import LatentGeneratorConfig, train_latent_generator
from models.diffusion.testing import tiny_latent_training_data, train_tiny_latent_generator
from models.generator_kinds import GENERATOR_KINDS, TRAINABLE_RESOLUTIONS, generator_kind, kind_for_resolution

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def latent_gen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_latent_generator(tmp_path_factory.mktemp("latent") / "gen")[0]


@pytest.fixture(scope="module")
def latent_pipe(latent_gen: Path) -> CXRDiffusionPipeline:
    return CXRDiffusionPipeline.from_pretrained(latent_gen, device="cpu", micro_batch=4)


# ----------------------------------------------------------------------------- registry and configs


def test_kind_registry_maps_resolutions_and_refuses_others() -> None:
    assert kind_for_resolution(64) == "pixel" and kind_for_resolution(224) == "latent"
    assert kind_for_resolution(256) == "latent"
    assert set(TRAINABLE_RESOLUTIONS) == {r for rs in GENERATOR_KINDS.values() for r in rs}
    with pytest.raises(ValueError, match="not trainable"):
        kind_for_resolution(100)
    assert generator_kind({}) == "pixel"
    with pytest.raises(ValueError, match="unknown generator kind"):
        generator_kind({"kind": "gan"})


def test_latent_config_defaults_match_between_stages() -> None:
    cfg = LatentGeneratorConfig.for_resolution(224)
    assert cfg.autoencoder.latent_size == 56 and cfg.unet.resolution == 56
    assert cfg.unet.in_channels == cfg.autoencoder.latent_channels == 4 and not cfg.unet.clip_sample
    assert LatentGeneratorConfig.for_resolution(256).unet.resolution == 64
    assert LatentGeneratorConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="latent generators train at"):
        LatentGeneratorConfig.for_resolution(64)
    with pytest.raises(ValueError, match="must denoise"):
        LatentGeneratorConfig(cfg.autoencoder, cfg.unet.replace(resolution=64))
    with pytest.raises(ValueError, match="clip_sample"):
        LatentGeneratorConfig(cfg.autoencoder, cfg.unet.replace(clip_sample=True))
    with pytest.raises(ValueError, match="divisible"):
        AutoencoderConfig(resolution=226)
    with pytest.raises(ValueError, match="crop_size"):
        AutoencoderConfig(resolution=64, crop_size=128)


def test_holdout_split_keeps_patients_whole() -> None:
    patients = [f"p{i // 3}" for i in range(30)]
    train, held = holdout_split(30, patients, 0.2, seed=0)
    assert len(train) + len(held) == 30 and len(held) == 6
    assert not {patients[i] for i in train} & {patients[i] for i in held}


def test_bicubic_round_trip_and_metrics_are_sane() -> None:
    td = tiny_latent_training_data(num_images=8)
    same = reconstruction_metrics(td.images, td.images)
    assert same["ssim"] == pytest.approx(1.0) and same["psnr_db"] > 60
    rt = reconstruction_metrics(td.images, bicubic_round_trip(td.images, 16))
    assert 15 < rt["psnr_db"] < 60 and rt["ssim"] < 1.0


# ----------------------------------------------------------------------------- stage 1: autoencoder


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_autoencoder_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    td = tiny_latent_training_data(num_images=16)
    cfg = AutoencoderConfig.tiny(max_steps=6, checkpoint_every=2)
    full = train_autoencoder(td.images, cfg, tmp_path / "a", patient_ids=td.patient_ids, device="cpu",
                             evaluate=False)

    def stop_at_3(step: int, total: int, message: str) -> None:
        if step == 3:
            raise Canceled

    with pytest.raises(Canceled):
        train_autoencoder(td.images, cfg, tmp_path / "b", on_step=stop_at_3, patient_ids=td.patient_ids,
                          device="cpu", evaluate=False)
    assert read_checkpoint(tmp_path / "b")["step"] == 3
    resumed = train_autoencoder(td.images, cfg, tmp_path / "b", resume=True, patient_ids=td.patient_ids,
                                device="cpu", evaluate=False)
    a, b = _weights(full.vae), _weights(resumed.vae)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.losses == full.losses
    assert full.vae.config["scaling_factor"] == pytest.approx(resumed.vae.config["scaling_factor"])


def test_autoencoder_reports_heldout_reconstruction_beside_bicubic(tmp_path: Path) -> None:
    td = tiny_latent_training_data(num_images=16)
    res = train_autoencoder(td.images, AutoencoderConfig.tiny(max_steps=2), patient_ids=td.patient_ids,
                            device="cpu")
    assert res.holdout_indices is not None and len(res.holdout_indices) == 3
    m = res.metrics
    assert m["resolution"] == 64 and m["autoencoder"]["images"] == 3
    assert np.isfinite(m["autoencoder"]["psnr_db"]) and np.isfinite(m["bicubic"]["psnr_db"])
    assert m["bicubic"]["via_px"] == 16
    assert res.vae.config["scaling_factor"] > 0


def test_autoencoder_refuses_bad_images() -> None:
    cfg = AutoencoderConfig.tiny()
    with pytest.raises(ValueError, match="config says"):
        train_autoencoder(np.zeros((4, 32, 32), np.uint8), cfg)
    with pytest.raises(ValueError, match="uint8"):
        train_autoencoder(np.zeros((4, 64, 64), np.float32), cfg)


# ----------------------------------------------------------------------------- export and loading


def test_export_loads_in_plain_diffusers_component_by_component(latent_gen: Path) -> None:
    vae = AutoencoderKL.from_pretrained(latent_gen, subfolder="vae")
    unet = UNet2DModel.from_pretrained(latent_gen, subfolder="unet")
    sched = DDPMScheduler.from_pretrained(latent_gen, subfolder="scheduler")
    assert vae.config["in_channels"] == 1 and vae.config["latent_channels"] == unet.config["in_channels"] == 4
    assert unet.config["sample_size"] == 16 and sched.config["prediction_type"] == "v_prediction"
    assert not sched.config["clip_sample"]
    meta = read_generator_metadata(latent_gen)
    assert meta["kind"] == "latent" and meta["resolution"] == 64
    assert meta["latent"]["resolution"] == 16 and meta["latent"]["scaling_factor"] > 0
    assert meta["autoencoder"]["heldout"]["autoencoder"]["images"] > 0
    # Plain diffusers, no cxrsynth code: denoise one latent with the scheduler, decode with the vae.
    sched.set_timesteps(4)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in sched.timesteps:
            z = sched.step(unet(z, t, class_labels=torch.tensor([1])).sample, t, z).prev_sample
        img = vae.decode(z / vae.config["scaling_factor"] + vae.config["shift_factor"]).sample
    assert img.shape == (1, 1, 64, 64) and torch.isfinite(img).all()
    card = (latent_gen / "README.md").read_text()
    assert 'subfolder="vae"' in card and "held-out" in card and "CC BY 4.0" in card
    for name in ("training_index.safetensors", "privacy_index.safetensors", "privacy_calibration.json"):
        assert (latent_gen / name).is_file(), name
    assert json.loads((latent_gen / "vae" / "autoencoder.json").read_text())["config"]["resolution"] == 64


def test_pipeline_samples_full_size_images_from_a_latent_generator(latent_pipe: CXRDiffusionPipeline) -> None:
    assert latent_pipe.kind == "latent" and latent_pipe.resolution == 64 and latent_pipe.sample_size == 16
    out = latent_pipe(labels=["normal", "pneumonia"], seed=3, num_inference_steps=4)
    assert out.images.shape == (2, 64, 64) and out.images.dtype == np.uint8
    assert out.metadata[0]["kind"] == "latent" and out.metadata[0]["resolution"] == 64
    with pytest.raises(ValueError, match="makes 64 px"):
        latent_pipe(labels=["normal"], resolution=16)


@pytest.mark.parametrize("sampler", ["dpmsolver++", "sde-dpmsolver++", "ddim"])
def test_latent_images_do_not_depend_on_batch_or_shard(latent_pipe: CXRDiffusionPipeline, sampler: str) -> None:
    labels = ["normal", "pneumonia", "pneumonia", "normal", "normal"]
    whole = latent_pipe(labels=labels, seed=11, sampler=sampler, num_inference_steps=4, batch_size=5).images
    small = latent_pipe(labels=labels, seed=11, sampler=sampler, num_inference_steps=4, batch_size=2).images
    shard = latent_pipe(labels=labels[3:], image_indices=[3, 4], seed=11, sampler=sampler,
                        num_inference_steps=4).images
    assert np.array_equal(whole, small)
    assert np.array_equal(whole[3:], shard)
    other = latent_pipe(labels=labels, seed=12, sampler=sampler, num_inference_steps=4).images
    assert not np.array_equal(whole, other)


# ----------------------------------------------------------------------------- both stages: resume, warm start


def test_latent_generator_resumes_either_stage_to_the_same_weights(tmp_path: Path) -> None:
    td = tiny_latent_training_data(num_images=16)
    cfg = LatentGeneratorConfig.tiny(autoencoder={"max_steps": 4, "checkpoint_every": 2}, max_steps=4,
                                     checkpoint_every=2)
    seen: list[tuple[int, int, str]] = []
    full = train_latent_generator(td, tmp_path / "full", cfg, tmp_path / "ck_full", device="cpu",
                                  sample_grid=False, on_step=lambda s, t, m: seen.append((s, t, m)))
    assert seen[-1][:2] == (8, 8) and seen[0][2].startswith("autoencoder:") and seen[-1][2].startswith("diffusion:")
    for stop in (3, 7):  # 3: inside stage 1 (autoencoder), 7: inside stage 2 (diffusion)
        ck = tmp_path / f"ck{stop}"

        def cancel(step: int, total: int, message: str, stop: int = stop) -> None:
            if step == stop and ":" in message and "encoding" not in message:
                raise Canceled

        with pytest.raises(Canceled):
            train_latent_generator(td, tmp_path / f"out{stop}", cfg, ck, device="cpu", sample_grid=False,
                                   on_step=cancel)
        resumed = train_latent_generator(td, tmp_path / f"out{stop}", cfg, ck, resume=True, device="cpu",
                                         sample_grid=False)
        assert resumed.losses == full.losses
        for sub in ("unet", "vae"):
            a = (tmp_path / "full" / sub / "diffusion_pytorch_model.safetensors").read_bytes()
            b = (tmp_path / f"out{stop}" / sub / "diffusion_pytorch_model.safetensors").read_bytes()
            assert a == b, (stop, sub)


def test_warm_start_reuses_the_autoencoder_and_the_unet(latent_gen: Path, tmp_path: Path) -> None:
    td = tiny_latent_training_data(num_images=64)
    cfg = LatentGeneratorConfig.tiny(max_steps=2)
    seen: list[str] = []
    res = train_latent_generator(td, tmp_path / "phase2", cfg, device="cpu", sample_grid=False, init_from=latent_gen,
                                 on_step=lambda s, t, m: seen.append(m))
    assert not any(m.startswith("autoencoder:") for m in seen)
    meta = read_generator_metadata(tmp_path / "phase2")
    assert meta["autoencoder"]["reused_from"] == latent_gen.name
    a = load_vae(latent_gen / "vae").state_dict()
    b = load_vae(tmp_path / "phase2" / "vae").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert res.steps == 2
    first = read_generator_metadata(latent_gen)["training"]["steps"]
    assert meta["training"]["warm_start"] == {"from": latent_gen.name, "steps": first}
    assert meta["training"]["total_steps"] == first + 2
    assert f"{first + 2:,} UNet steps in all" in (tmp_path / "phase2" / "README.md").read_text()


def test_latent_training_refuses_data_of_the_wrong_size(tmp_path: Path) -> None:
    td = tiny_latent_training_data(num_images=8, resolution=32)
    with pytest.raises(ValueError, match="makes 64 px"):
        train_latent_generator(td, tmp_path / "x", LatentGeneratorConfig.tiny(), device="cpu")


def test_decoder_phase_keeps_the_latents_and_resumes_exactly(tmp_path: Path) -> None:
    td = tiny_latent_training_data(num_images=16)
    cfg = LatentGeneratorConfig.tiny(autoencoder={"max_steps": 3, "decoder_steps": 4, "checkpoint_every": 2},
                                     max_steps=2)
    seen: list[tuple[int, int, str]] = []
    train_latent_generator(td, tmp_path / "full", cfg, tmp_path / "ck", device="cpu", sample_grid=False,
                           on_step=lambda s, t, m: seen.append((s, t, m)))
    assert [s for s, _, m in seen if "decoder:" in m] == [4, 5, 6, 7] and seen[-1][:2] == (9, 9)
    meta = read_generator_metadata(tmp_path / "full")
    assert meta["autoencoder"]["decoder_steps"] == 4 and meta["autoencoder"]["heldout"]["autoencoder"]["images"]
    # The encoder is frozen in the decoder phase: the same latents as after the main phase.
    main_vae = load_vae(tmp_path / "ck" / "vae")
    ae_only = AutoencoderConfig.tiny(max_steps=3)
    plain = train_autoencoder(td.images, ae_only, patient_ids=td.patient_ids, device="cpu", evaluate=False).vae
    enc = {k: v for k, v in main_vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
    ref = plain.state_dict()
    assert enc and all(torch.equal(v, ref[k]) for k, v in enc.items())
    assert any(not torch.equal(v, ref[k]) for k, v in main_vae.state_dict().items() if k.startswith("decoder."))

    def cancel(step: int, total: int, message: str) -> None:
        if step == 5 and "decoder:" in message:
            raise Canceled

    with pytest.raises(Canceled):
        train_latent_generator(td, tmp_path / "part", cfg, tmp_path / "ck2", device="cpu", sample_grid=False,
                               on_step=cancel)
    train_latent_generator(td, tmp_path / "part", cfg, tmp_path / "ck2", resume=True, device="cpu",
                           sample_grid=False)
    for sub in ("unet", "vae"):
        a = (tmp_path / "full" / sub / "diffusion_pytorch_model.safetensors").read_bytes()
        b = (tmp_path / "part" / sub / "diffusion_pytorch_model.safetensors").read_bytes()
        assert a == b, sub


def test_replace_decoder_swaps_only_a_decoder_of_the_same_encoder(latent_gen: Path, tmp_path: Path) -> None:
    import shutil

    from models.diffusion.autoencoder import finetune_decoder, save_vae
    from models.diffusion.latent import replace_decoder

    gen = tmp_path / "gen"
    shutil.copytree(latent_gen, gen)
    td = tiny_latent_training_data(num_images=16)
    cfg = AutoencoderConfig.from_dict(json.loads((gen / "vae" / "autoencoder.json").read_text())["config"])
    cfg = cfg.replace(decoder_steps=2)
    tuned = finetune_decoder(load_vae(gen / "vae"), td.images, cfg, patient_ids=td.patient_ids, device="cpu")
    save_vae(tuned.vae, tmp_path / "tuned", cfg, {"decoder_steps": 2, "heldout": tuned.metrics})
    before = CXRDiffusionPipeline.from_pretrained(gen, device="cpu")(labels=["normal"], seed=0,
                                                                      num_inference_steps=3).images
    replace_decoder(gen, tmp_path / "tuned", notes="decoder fine-tuned")
    after = CXRDiffusionPipeline.from_pretrained(gen, device="cpu")(labels=["normal"], seed=0,
                                                                     num_inference_steps=3).images
    assert not np.array_equal(before, after)
    assert read_generator_metadata(gen)["autoencoder"]["decoder_steps"] == 2
    assert "decoder fine-tuned" in (gen / "README.md").read_text()
    other = train_autoencoder(td.images, AutoencoderConfig.tiny(max_steps=2, seed=9), patient_ids=td.patient_ids,
                              device="cpu", evaluate=False)
    save_vae(other.vae, tmp_path / "other", AutoencoderConfig.tiny(), {})
    with pytest.raises(ValueError, match="another encoder"):
        replace_decoder(gen, tmp_path / "other")
