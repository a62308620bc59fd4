"""Data-parallel training with torchrun on CPU (gloo, 2 ranks): the same weights as one process at the
same global batch, the data split, a killed rank failing the run cleanly, and resuming after it."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from models.callbacks import Canceled
from models.checkpoints import read_checkpoint
from models.diffusion.config import TrainingConfig
from models.diffusion.training import _DataOrder, train_generator
from models.distributed import World, check_global_batch, shard_rows
from models.launch import DistributedRunError, launch, make_spec, root_cause
from models.ssl.augment import dino_views
from models.ssl.config import PretrainConfig
from models.ssl.data import StepBatchSampler
from models.ssl.training import pretrain
from models.torchrun import LaunchOptions, torchrun_command

TWO = LaunchOptions(nproc_per_node=2)


def _image_folder(root: Path, n: int = 16, size: int = 32) -> Path:
    """A small two-class ImageFolder of smooth random images (deterministic)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        label = "normal" if i % 2 else "pneumonia"
        (root / label).mkdir(parents=True, exist_ok=True)
        low = rng.integers(0, 255, (size // 4, size // 4), dtype=np.uint8)
        Image.fromarray(low).resize((size, size), Image.Resampling.BILINEAR).save(root / label / f"im{i:03d}.png")
    return root


def _assert_states_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())
    assert worst <= atol, f"largest difference {worst:.3g} > {atol}"


# ---------------------------------------------------------------------------------------------------
# The split and the randomness (no processes needed)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_each_sample_once_per_epoch_across_ranks(world_size: int) -> None:
    n, batch = 48, 8
    seen: list[int] = []
    for rank in range(world_size):
        sampler = StepBatchSampler(n, batch, seed=3, start_step=0, total_steps=n // batch, w=World(rank, world_size))
        seen += [i for b in sampler for i in b]
    assert sorted(seen) == list(range(n))
    # and rank r of step s holds rows r::W of the one-process batch
    one = StepBatchSampler(n, batch, seed=3, start_step=0, total_steps=1)
    two = StepBatchSampler(n, batch, seed=3, start_step=0, total_steps=1, w=World(1, 2))
    assert next(iter(two)) == next(iter(one))[1::2]


def test_generator_order_split_covers_an_epoch_once() -> None:
    order, w = _DataOrder(40, seed=5), [World(r, 4) for r in range(4)]
    seen = [i for _ in range(5) for b in [order.next_batch(8)] for r in w for i in shard_rows(b, r)]
    assert sorted(seen) == list(range(40))


def test_global_batch_must_split_evenly() -> None:
    assert check_global_batch(12, World(0, 4)) == 3
    with pytest.raises(ValueError, match="multiple of the 3 ranks"):
        check_global_batch(8, World(0, 3))


def test_views_of_a_rank_equal_its_rows_of_the_one_process_views() -> None:
    views, x = dino_views(32, 16, 2), torch.rand(8, 1, 40, 40)
    torch.manual_seed(7)
    whole = views(x)
    for rank in range(2):
        torch.manual_seed(7)  # every rank draws the global batch's parameters from the same seed
        part = views(x[rank::2], World(rank, 2))
        for v_whole, v_part in zip(whole, part, strict=True):
            assert torch.equal(v_whole[rank::2], v_part)


def test_torchrun_command_single_machine_and_rendezvous() -> None:
    one = torchrun_command(LaunchOptions(nproc_per_node=4), ["-m", "models.launch", "s.json"])
    assert one[1:3] == ["-m", "torch.distributed.run"] and "--standalone" in one
    assert one[one.index("--nproc-per-node") + 1] == "4" and one[-3:] == ["-m", "models.launch", "s.json"]
    two = torchrun_command(LaunchOptions(nproc_per_node=8, nnodes=2, rdzv_endpoint="10.0.0.1:29400", rdzv_id="j1"),
                           ["-m", "models.launch", "s.json"])
    assert "--standalone" not in two
    assert two[two.index("--rdzv-endpoint") + 1] == "10.0.0.1:29400" and two[two.index("--nnodes") + 1] == "2"
    with pytest.raises(ValueError, match="rdzv_endpoint"):
        LaunchOptions(nproc_per_node=1, nnodes=2)


def test_root_cause_is_torchruns_report() -> None:
    log = ("noise\n" + "=" * 40 + "\nFailures:\n  <NO_OTHER_FAILURES>\n" + "-" * 40 + "\nRoot Cause (first observed "
           "failure):\n[0]:\n  rank      : 1 (local_rank: 1)\n  exitcode  : -9 (pid: 42)\n" + "=" * 40 + "\n")
    text = root_cause(log)
    assert text.startswith("Root Cause") and "rank      : 1" in text and "exitcode  : -9" in text



def test_root_cause_of_a_signalled_rank_keeps_the_ranks_last_words() -> None:
    # A C++ abort leaves no Python traceback in the report: the rank's own last lines are the only clue.
    rule = "=" * 40
    log = ("step 3\nterminate called after throwing an instance of 'gloo::IoException'\n  what():  closed by peer\n"
           "E1207 api.py:882] failed (exitcode: -6) local_rank: 1 (pid: 42)\nTraceback (most recent call last):\n"
           "  File \"run.py\"\nChildFailedError:\n" + rule + "\nmodels.launch FAILED\n" + "-" * 40 +
           "\nRoot Cause (first observed failure):\n[0]:\n  rank      : 1 (local_rank: 1)\n  exitcode  : -6 (pid: 42)\n"
           "  traceback : Signal 6 (SIGABRT) received by PID 42\n" + rule + "\n")
    text = root_cause(log)
    assert text.startswith("Root Cause") and "Signal 6" in text
    assert "gloo::IoException" in text and "closed by peer" in text
    assert "ChildFailedError" not in text and "run.py" not in text  # torchrun's own traceback is cut off
    # a rank that raised keeps the report alone (its traceback is in it)
    raised = log.replace("  traceback : Signal 6 (SIGABRT) received by PID 42", "  traceback : ValueError: bad")
    assert "gloo" not in root_cause(raised)

# ---------------------------------------------------------------------------------------------------
# Two ranks = one process at the same global batch
# ---------------------------------------------------------------------------------------------------
def test_generator_two_ranks_equal_one_process(tmp_path: Path) -> None:
    data = _image_folder(tmp_path / "data")
    config = TrainingConfig.tiny(max_steps=4, batch_size=8, checkpoint_every=4)
    one = train_generator(data, None, config, checkpoint_dir=tmp_path / "one", device="cpu")
    spec = make_spec("train_generator", data=data, out_dir=tmp_path / "out", config=config.to_dict(),
                     checkpoint_dir=tmp_path / "two", resume=False, device="cpu")
    result = launch(spec, TWO, tmp_path / "run")
    assert result is not None and result["steps"] == 4 and result["world_size"] == 2
    a, b = read_checkpoint(tmp_path / "one"), read_checkpoint(tmp_path / "two")
    _assert_states_close(a["unet"], b["unet"], atol=1e-5)
    ema_a, ema_b = a["ema"]["shadow_params"], b["ema"]["shadow_params"]
    assert max(float((x - y).abs().max()) for x, y in zip(ema_a, ema_b, strict=True)) <= 1e-5
    assert np.allclose(one.losses, b["losses"], rtol=1e-4, atol=1e-6)
    assert (tmp_path / "out" / "cxrsynth.json").is_file()  # rank 0 exported


def test_dino_two_ranks_equal_one_process(tmp_path: Path) -> None:
    # A ViT: layer norm only, so two gloo ranks see exactly the one-process batch statistics (torch has no
    # SyncBatchNorm on CPU; on CUDA batch norm is synchronised).
    data = _image_folder(tmp_path / "data", size=40)
    config = PretrainConfig.tiny(method="dino", backbone="test_vit", backbone_kwargs={}, resolution=32,
                                 local_resolution=16, max_steps=3, batch_size=8, checkpoint_every=3,
                                 precision="fp32")
    one = pretrain(data, config, None, checkpoint_dir=tmp_path / "one", device="cpu")
    spec = make_spec("pretrain", data=data, out_dir=tmp_path / "enc", config=config.to_dict(),
                     checkpoint_dir=tmp_path / "two", resume=False, device="cpu")
    result = launch(spec, TWO, tmp_path / "run")
    assert result is not None and result["steps"] == 3
    a, b = read_checkpoint(tmp_path / "one"), read_checkpoint(tmp_path / "two")
    _assert_states_close(a["model"], b["model"], atol=1e-5)  # student, teacher (EMA) and the DINO centre
    assert np.allclose(one.losses, b["losses"], rtol=1e-4, atol=1e-6)
    assert (tmp_path / "enc" / "config.json").is_file()


def test_latent_generator_two_ranks_equal_one_process(tmp_path: Path) -> None:
    # Stage 1 (autoencoder) on rank 0 while rank 1 waits for its folder; stage 2 (UNet) data-parallel.
    from models.diffusion.latent import LatentGeneratorConfig, train_latent_generator

    data = _image_folder(tmp_path / "data", size=64)
    config = LatentGeneratorConfig.tiny(autoencoder={"max_steps": 2, "checkpoint_every": 2}, max_steps=3,
                                        batch_size=8, checkpoint_every=3)
    train_latent_generator(data, None, config, tmp_path / "one", device="cpu", sample_grid=False)
    spec = make_spec("train_latent_generator", data=data, out_dir=None, config=config.to_dict(),
                     checkpoint_dir=tmp_path / "two", resume=False, device="cpu")
    result = launch(spec, TWO, tmp_path / "run")
    assert result is not None and result["steps"] == 3
    a, b = read_checkpoint(tmp_path / "one" / "unet"), read_checkpoint(tmp_path / "two" / "unet")
    _assert_states_close(a["unet"], b["unet"], atol=1e-5)
    assert np.allclose(a["losses"], b["losses"], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# A killed rank fails the run with torchrun's report; the next run resumes from the checkpoint
# ---------------------------------------------------------------------------------------------------
def _rank_pid(spec_path: Path, rank: int) -> int | None:
    """The pid of the process running ``spec_path`` as ``rank`` (from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(spec_path).encode() in cmdline and b"models.launch" in cmdline and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def test_killed_rank_fails_cleanly_and_the_next_run_resumes(tmp_path: Path) -> None:
    data = _image_folder(tmp_path / "data")
    config = TrainingConfig.tiny(max_steps=100_000, batch_size=8, checkpoint_every=3)
    ckpt, run = tmp_path / "ckpt", tmp_path / "run"
    killed: list[int] = []

    def kill_rank_1(step: int, total: int, message: str) -> None:
        if step >= 4 and not killed:
            pid = _rank_pid(run / "spec.json", 1)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    spec = make_spec("train_generator", data=data, out_dir=None, config=config.to_dict(), checkpoint_dir=ckpt,
                     resume=False, device="cpu")
    with pytest.raises(DistributedRunError) as info:
        launch(spec, TWO, run, on_step=kill_rank_1)
    message = str(info.value)
    assert killed and "rank" in message and "1" in message and "resume" in message
    assert "-9" in message or "SIGKILL" in message
    before = read_checkpoint(ckpt)
    saved = int(before["step"])
    assert saved >= 3 and saved % 3 == 0

    steps: list[int] = []
    resumed = make_spec("train_generator", data=data, out_dir=None,
                        config=config.replace(max_steps=saved + 3).to_dict(), checkpoint_dir=ckpt, resume=True,
                        device="cpu")
    result = launch(resumed, TWO, run, on_step=lambda s, t, m: steps.append(s))
    assert result is not None and result["steps"] == saved + 3
    assert saved < steps[0] <= saved + 3  # progress went on from the checkpoint, not from step 0
    after = read_checkpoint(ckpt)
    assert after["losses"][:saved] == before["losses"] and len(after["losses"]) == saved + 3


def test_cancel_reaches_every_rank_and_checkpoints(tmp_path: Path) -> None:
    data = _image_folder(tmp_path / "data")
    config = PretrainConfig.tiny(max_steps=10_000, checkpoint_every=1000)
    ckpt = tmp_path / "ckpt"

    def cancel_at_3(step: int, total: int, message: str) -> None:
        if step >= 3:
            raise Canceled()

    spec = make_spec("pretrain", data=data, out_dir=tmp_path / "enc", config=config.to_dict(), checkpoint_dir=ckpt,
                     resume=False, device="cpu")
    with pytest.raises(Canceled):
        launch(spec, TWO, tmp_path / "run", on_step=cancel_at_3)
    state: dict[str, Any] = read_checkpoint(ckpt)
    assert 3 <= int(state["step"]) < 10_000  # every rank stopped; rank 0 checkpointed where they stopped
    assert not (tmp_path / "enc").exists()


def test_resume_with_another_world_size(tmp_path: Path) -> None:
    data = _image_folder(tmp_path / "data")
    config = PretrainConfig.tiny(max_steps=4, checkpoint_every=2)
    spec = make_spec("pretrain", data=data, out_dir=None, config=config.to_dict(), checkpoint_dir=tmp_path / "ck",
                     resume=False, device="cpu")

    def stop_at_2(step: int, total: int, message: str) -> None:
        if step >= 2:
            raise Canceled()

    with pytest.raises(Canceled):
        launch(spec, TWO, tmp_path / "run", on_step=stop_at_2)
    # one process takes over the global state the two ranks saved
    result = pretrain(data, config, None, checkpoint_dir=tmp_path / "ck", resume=True, device="cpu")
    assert result.steps == 4 and len(result.losses) == 4


# ---------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------
def test_cli_pretrain_and_train_generator_on_two_processes(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from app.cli import app
    from models.ssl.export import load_encoder

    runner = CliRunner()
    data = _image_folder(tmp_path / "data")
    out = tmp_path / "enc"
    result = runner.invoke(app, ["pretrain", "--data", str(data), "--out", str(out), "--resolution", "32",
                                 "--batch-size", "4", "--steps", "2", "--device", "cpu", "--nproc-per-node", "2"])
    assert result.exit_code == 0, result.output
    assert "pretrained 2 steps" in result.output and load_encoder(out) is not None
    assert not out.with_name("enc.ckpt").exists()  # a finished run leaves no checkpoint

    bad = runner.invoke(app, ["pretrain", "--data", str(data), "--out", str(out), "--resolution", "32",
                              "--batch-size", "5", "--steps", "2", "--device", "cpu", "--nproc-per-node", "2"])
    assert bad.exit_code != 0 and "multiple of the 2 ranks" in bad.output
    many = runner.invoke(app, ["pretrain", "--data", str(data), "--out", str(out), "--nnodes", "2"])
    assert many.exit_code == 2 and "rdzv_endpoint" in many.output

    gen = runner.invoke(app, ["train-generator", "--data", str(data), "--out", str(tmp_path / "gen"),
                              "--resolution", "32", "--steps", "2", "--batch-size", "4", "--device", "cpu",
                              "--nproc-per-node", "2"])
    assert gen.exit_code == 0, gen.output
    assert (tmp_path / "gen" / "cxrsynth.json").is_file()


# ---------------------------------------------------------------------------------------------------
# The worker's devices and GPU leases
# ---------------------------------------------------------------------------------------------------
def test_worker_devices_and_capacity(tmp_path: Path) -> None:
    from app.core.config import Settings
    from app.core.devices import worker_devices
    from worker.multi_gpu import check_capacity

    assert worker_devices(Settings(worker_gpus="")).count == 0
    four = worker_devices(Settings(worker_gpus="0, 1,2,3"))
    assert four.kind == "cuda" and four.ids == ("0", "1", "2", "3")
    assert worker_devices(Settings(worker_gpus="cpu:2")) == type(four)("cpu", ("0", "1"))
    for bad in ("0,0", "a,b", "cpu:0"):
        with pytest.raises(ValueError, match="worker_gpus"):
            worker_devices(Settings(worker_gpus=bad))
    assert check_capacity(Settings(worker_gpus="0,1"), 2) is None
    reason = check_capacity(Settings(worker_gpus=""), 2)
    assert reason is not None and "asks for 2 GPUs" in reason and "no devices" in reason


def test_gpu_leases_exclude_each_other(tmp_path: Path) -> None:
    import threading
    import time

    from app.core.config import Settings
    from worker.multi_gpu import gpu_leases

    settings = Settings(data_dir=tmp_path)
    order: list[str] = []
    held = threading.Event()

    def multi_gpu_job() -> None:
        with gpu_leases(settings, ("1", "0")):
            held.set()
            time.sleep(0.3)
            order.append("multi done")

    t = threading.Thread(target=multi_gpu_job)
    t.start()
    held.wait(5)
    with gpu_leases(settings, ("1",)):  # a per-GPU process waits until the multi-GPU job let GPU 1 go
        order.append("single started")
    t.join()
    assert order == ["multi done", "single started"]


def test_worker_gpus_starts_per_gpu_processes_and_the_multi_gpu_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """``cxrsynth worker --gpus 0,1``: the process plan (no GPU here, so the Celery processes are recorded,
    not started)."""
    from typer.testing import CliRunner

    import app.cli as cli

    started: list[tuple[list[str], dict[str, str]]] = []

    class Recorded:
        def __init__(self, cmd: list[str], env: dict[str, str] | None = None) -> None:
            started.append((cmd, env or {}))

        def wait(self) -> int:
            return 0

    monkeypatch.setattr(cli.subprocess, "Popen", Recorded)
    monkeypatch.setattr("app.db.session.migrate", lambda url: None)
    result = CliRunner().invoke(cli.app, ["worker", "--gpus", "0,1"])
    assert result.exit_code == 0, result.output
    per_gpu = [(c, e) for c, e in started if e.get("CXRSYNTH_LEASED_GPU")]
    assert [e["CUDA_VISIBLE_DEVICES"] for _c, e in per_gpu] == ["0", "1"]
    assert all(c[c.index("-Q") + 1] == "gpu,cpu" for c, _e in per_gpu)
    multi = [(c, e) for c, e in started if c[c.index("-Q") + 1] == "gpus"]
    assert len(multi) == 1 and multi[0][1]["CXRSYNTH_WORKER_GPUS"] == "0,1"
    bad = CliRunner().invoke(cli.app, ["worker", "--gpus", "0,x"])
    assert bad.exit_code == 2 and "worker_gpus" in bad.output
