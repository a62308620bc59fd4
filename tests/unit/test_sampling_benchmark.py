"""``benchmarks/sampling.py``'s FID sample cache: a killed run resumes to exactly the images of an
uninterrupted one (the hour-long 1000-step DDPM row depends on it), and sampler specs parse or fail."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import sampling as bench
from models.diffusion import CXRDiffusionPipeline

torch.set_num_threads(1)


def test_sampler_specs_parse_or_fail() -> None:
    assert bench.parse_sampler_specs("ddpm-1000, dpmsolver++-20") == [("ddpm", 1000), ("dpmsolver++", 20)]
    for bad in ("ddpm", "ddpm-x", "-20"):
        with pytest.raises(SystemExit, match="bad sampler spec"):
            bench.parse_sampler_specs(bad)


def test_cached_samples_resume_after_a_lost_chunk(tiny_generator: Path, tmp_path: Path) -> None:
    pipe = CXRDiffusionPipeline.from_pretrained(tiny_generator, device="cpu", micro_batch=2)
    labels: list[str | None] = ["normal", "pneumonia", "pneumonia", "normal", "normal"]
    kw = dict(seed=3, sampler="ddpm", steps=4, guidance=1.0, batch=4, chunk=2)
    whole, t1 = bench.cached_samples(pipe, labels, cache=tmp_path / "a", **kw)  # type: ignore[arg-type]
    assert whole.shape == (5, 32, 32) and t1["generated_now"] == 5
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "chunk_000000_2.npy", "chunk_000002_2.npy", "chunk_000004_1.npy"]

    (tmp_path / "a" / "chunk_000002_2.npy").unlink()  # as if the run was killed inside that chunk
    again, t2 = bench.cached_samples(pipe, labels, cache=tmp_path / "a", **kw)  # type: ignore[arg-type]
    assert t2["generated_now"] == 2  # only the lost chunk was sampled again
    assert np.array_equal(whole, again)
    # and the chunks equal one uninterrupted request of all five images
    direct = pipe(labels=labels, seed=3, sampler="ddpm", num_inference_steps=4, guidance_scale=1.0).images
    assert np.array_equal(whole, direct)
