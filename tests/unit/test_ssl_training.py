"""DINO / SimCLR wiring, the pretraining loop, exact resume, cancellation, and data sources."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.callbacks import Canceled
from models.ssl import (
    DINO,
    PretrainConfig,
    SimCLR,
    StepBatchSampler,
    build_ssl_model,
    load_checkpoint,
    normalize,
    pretrain,
    pretraining_dataset,
)
from models.ssl.data import ArrayImages, FolderImages

torch.set_num_threads(1)


def _images(n: int = 24, size: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth random blobs (more structure than white noise, so SSL has something to learn)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.empty((n, size, size), np.uint8)
    for i in range(n):
        cx, cy = rng.uniform(8, size - 8, 2)
        r = rng.uniform(3, 8)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))
        out[i] = np.clip(40 + 180 * blob + rng.normal(0, 10, (size, size)), 0, 255).astype(np.uint8)
    return out


@pytest.mark.parametrize("method", ["dino", "simclr"])
def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(method: str) -> None:
    torch.manual_seed(0)
    cfg = PretrainConfig.tiny(method=method)
    model = build_ssl_model(cfg)
    assert isinstance(model, DINO if method == "dino" else SimCLR)
    model.train()
    x = torch.from_numpy(_images(8)).unsqueeze(1)
    views = [normalize(v, cfg.norm_mean, cfg.norm_std) for v in model.views()(x)]
    assert len(views) == (2 + cfg.n_local_crops if method == "dino" else 2)
    opt = torch.optim.AdamW(model.trainable_modules().parameters(), lr=1e-3)
    losses = []
    for step in range(8):
        loss = model.training_loss(views, step, 8)
        opt.zero_grad()
        loss.backward()
        model.before_optimizer_step(step, 8)
        opt.step()
        model.after_optimizer_step(step, 8)
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses


def test_dino_teacher_is_an_ema_of_the_student_on_a_cosine_schedule() -> None:
    torch.manual_seed(0)
    cfg = PretrainConfig.tiny(method="dino", momentum_start=0.9)
    model = build_ssl_model(cfg)
    assert isinstance(model, DINO)
    s0 = [p.detach().clone() for p in model.student_backbone.parameters()]
    t0 = [p.detach().clone() for p in model.teacher_backbone.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(s0, t0, strict=True))  # teacher starts as the student
    for p in model.teacher_backbone.parameters():
        assert not p.requires_grad
    with torch.no_grad():
        for p in model.student_backbone.parameters():
            p.add_(1.0)
    m = model.momentum(0, 10)
    assert m == pytest.approx(0.9)
    assert model.momentum(10, 10) == pytest.approx(1.0)
    assert 0.9 < model.momentum(5, 10) < 1.0
    model.after_optimizer_step(0, 10)
    for t_before, s_now, t_now in zip(t0, model.student_backbone.parameters(), model.teacher_backbone.parameters(),
                                      strict=True):
        assert torch.allclose(t_now, m * t_before + (1 - m) * s_now, atol=1e-6)
    # teacher temperature warm-up
    warm = DINO(build_ssl_model(cfg).encoder(), cfg.replace(warmup_teacher_temp=0.02, warmup_teacher_temp_steps=4))
    assert warm.teacher_temperature(0) == pytest.approx(0.02)
    assert warm.teacher_temperature(2) == pytest.approx(0.03)
    assert warm.teacher_temperature(4) == pytest.approx(cfg.teacher_temp)


def test_pretrain_reports_progress_and_exports(tmp_path: Path) -> None:
    seen: list[tuple[int, int, str]] = []
    cfg = PretrainConfig.tiny(method="simclr", max_steps=3)
    result = pretrain(_images(), cfg, tmp_path / "enc", on_step=lambda s, t, m: seen.append((s, t, m)), device="cpu")
    assert [s for s, _, _ in seen] == [1, 2, 3] and all(t == 3 for _, t, _ in seen)
    assert "simclr loss" in seen[-1][2]
    assert result.steps == 3 and len(result.losses) == 3 and np.isfinite(result.final_loss)
    assert result.data.num_images == 24 and result.data.source == "in-memory array"
    assert result.out_dir is not None and (result.out_dir / "model.safetensors").is_file()


def test_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    cfg = PretrainConfig.tiny(method="dino", max_steps=4, checkpoint_every=2)
    data = _images(12)
    full = pretrain(data, cfg, tmp_path / "full", checkpoint_dir=tmp_path / "ck-full", device="cpu")

    def cancel_at_2(step: int, total: int, message: str) -> None:
        if step == 2:
            raise Canceled

    with pytest.raises(Canceled):
        pretrain(data, cfg, tmp_path / "never", checkpoint_dir=tmp_path / "ck", on_step=cancel_at_2, device="cpu")
    assert not (tmp_path / "never").exists()
    state = load_checkpoint(tmp_path / "ck")
    assert state["step"] == 2 and len(state["losses"]) == 2
    assert not list((tmp_path / "ck").glob(".*tmp*"))  # atomic write left no temporary file
    resumed = pretrain(data, cfg, tmp_path / "resumed", checkpoint_dir=tmp_path / "ck", resume=True, device="cpu")
    assert resumed.steps == 4
    assert resumed.losses == full.losses
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="different PretrainConfig"):
        pretrain(data, cfg.replace(learning_rate=1.0), None, checkpoint_dir=tmp_path / "ck", resume=True, device="cpu")
    with pytest.raises(ValueError, match="checkpoint_dir"):
        pretrain(data, cfg, None, resume=True, device="cpu")


def test_folder_data_streams_from_disk_like_the_cached_path(tmp_path: Path) -> None:
    imgs = _images(10, size=40)
    for cls in ("normal", "pneumonia"):
        (tmp_path / "data" / cls).mkdir(parents=True)
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(tmp_path / "data" / ("normal" if i % 2 else "pneumonia") / f"im{i}.png")
    streamed, summary = pretraining_dataset(tmp_path / "data", 32, cache_limit_mb=0)
    cached, _ = pretraining_dataset(tmp_path / "data", 32)
    assert isinstance(streamed, FolderImages) and isinstance(cached, ArrayImages)
    assert summary.counts == {"normal": 5, "pneumonia": 5} and summary.source == "data"
    assert all(torch.equal(streamed[i], cached[i]) for i in range(10))
    cfg = PretrainConfig.tiny(method="simclr", max_steps=2, cache_limit_mb=0)
    a = pretrain(tmp_path / "data", cfg, None, device="cpu")
    b = pretrain(tmp_path / "data", cfg.replace(cache_limit_mb=512), None, device="cpu")
    assert a.losses == b.losses


def test_batch_order_depends_only_on_seed_and_step() -> None:
    s = StepBatchSampler(n=10, batch_size=4, seed=3, start_step=0, total_steps=6)
    batches = list(s)
    assert len(batches) == 6 and all(len(b) == 4 for b in batches)
    flat = [i for b in batches for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # epochs cover all
    later = StepBatchSampler(n=10, batch_size=4, seed=3, start_step=4, total_steps=6)
    assert list(later) == batches[4:]


def test_bad_pretraining_data(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no images"):
        pretraining_dataset(tmp_path, 32)
    with pytest.raises(ValueError, match="uint8"):
        pretraining_dataset(np.zeros((2, 8, 8), np.float32), 32)
    with pytest.raises(ValueError, match="empty"):
        pretraining_dataset(np.zeros((0, 8, 8), np.uint8), 32)
    with pytest.raises(ValueError, match="method"):
        PretrainConfig(method="mae")  # type: ignore[arg-type]


def test_an_unknown_method_never_falls_back_to_another() -> None:
    from models.ssl.training import SSL_METHODS

    assert set(SSL_METHODS) == {"dino", "simclr"}
    cfg = PretrainConfig.tiny(method="dino")
    object.__setattr__(cfg, "method", "byol")  # past the config's own check, as a stale saved config would be
    with pytest.raises(ValueError, match="unknown SSL method 'byol'"):
        build_ssl_model(cfg)


def test_precision_resolves_per_device_and_view_size() -> None:
    from models.device import cpu_bf16_supported
    from models.ssl.training import training_precision

    cpu = torch.device("cpu")
    tiny = PretrainConfig.tiny()  # 32 px globals, 16 px locals: below the CPU bf16 floor
    assert training_precision(tiny.replace(precision="fp32"), cpu) == "fp32"
    assert training_precision(tiny, cpu) == "fp32"  # auto falls back rather than risk non-reproducible runs
    if cpu_bf16_supported():
        assert training_precision(tiny.replace(resolution=64, local_resolution=32), cpu) == "bf16"
        assert training_precision(tiny.replace(method="simclr", resolution=32), cpu) == "bf16"  # no local views
        with pytest.raises(ValueError, match="at least 32 px"):
            training_precision(tiny.replace(precision="bf16"), cpu)
    else:
        with pytest.raises(ValueError, match="native bf16"):
            training_precision(tiny.replace(precision="bf16", resolution=64, local_resolution=32), cpu)
    with pytest.raises(ValueError, match="precision"):
        PretrainConfig.tiny(precision="fp16")  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_bf16_on_cpu_resumes_exactly(tmp_path: Path) -> None:
    from models.device import cpu_bf16_supported

    if not cpu_bf16_supported():
        pytest.skip("this CPU has no native bf16 (AVX512-BF16/AMX)")
    cfg = PretrainConfig.tiny(method="dino", resolution=64, local_resolution=32, max_steps=4, checkpoint_every=2,
                              precision="bf16")
    data = _images(12, size=64)
    full = pretrain(data, cfg, None, checkpoint_dir=tmp_path / "ck-full", device="cpu")
    assert full.device.endswith("bf16") and all(np.isfinite(full.losses))

    def cancel_at_2(step: int, total: int, message: str) -> None:
        if step == 2:
            raise Canceled

    with pytest.raises(Canceled):
        pretrain(data, cfg, None, checkpoint_dir=tmp_path / "ck", on_step=cancel_at_2, device="cpu")
    resumed = pretrain(data, cfg, None, checkpoint_dir=tmp_path / "ck", resume=True, device="cpu")
    assert resumed.losses == full.losses
    fp32 = pretrain(data, cfg.replace(precision="fp32"), None, device="cpu")
    assert fp32.device.endswith("fp32") and fp32.losses != full.losses  # bf16 really ran
