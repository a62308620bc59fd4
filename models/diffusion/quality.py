"""Bridge from a generator folder to the quality report of ``models.metrics``.

``pipeline_sampler`` turns a :class:`CXRDiffusionPipeline` into the ``Sampler`` protocol that
``models.metrics.report.report_for_samples`` calls, so the report never depends on pipeline internals.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from models.callbacks import OnStep
from models.diffusion.pipeline import CXRDiffusionPipeline, plan_generation


def pipeline_sampler(pipe: CXRDiffusionPipeline, sampler: str = "dpmsolver++", num_inference_steps: int | None = None,
                     guidance_scale: float | None = None, batch_size: int | None = None) -> Any:
    """A ``Sampler``: ``(n, seed, on_step) -> (uint8 (n, H, W), label ids or None)``, labels balanced."""

    def sample(n: int, seed: int, on_step: OnStep) -> tuple[np.ndarray, np.ndarray | None]:
        plan = plan_generation(n=n, seed=seed, label_names=pipe.label_names)
        kwargs: dict[str, Any] = {"seed": seed, "sampler": sampler, "num_inference_steps": num_inference_steps,
                                  "batch_size": batch_size, "callback": on_step, "output_type": "np"}
        if guidance_scale is not None:
            kwargs["guidance_scale"] = guidance_scale
        if pipe.conditional:
            out = pipe(labels=plan, **kwargs)
            ids = np.array([pipe.label_names.index(str(lab)) for lab in plan], dtype=np.int64)
            return np.asarray(out.images), ids
        out = pipe(num_images=n, **kwargs)
        return np.asarray(out.images), None

    return sample


def generator_quality_report(generator_dir: str | Path, real_dir: str | Path, n: int = 1000, *,
                             sampler: str = "dpmsolver++", num_inference_steps: int | None = None,
                             guidance_scale: float | None = None, seed: int = 0, device: str = "auto",
                             json_path: str | Path | None = None, grid_path: str | Path | None = None,
                             on_step: OnStep | None = None) -> dict[str, Any]:
    """Sample ``n`` images from a generator folder and report FID, PRDC, diversity and label fidelity
    against a real folder (with the real-vs-real yardstick row)."""
    from models.callbacks import no_progress
    from models.metrics.report import report_for_samples

    pipe = CXRDiffusionPipeline.from_pretrained(generator_dir, device=device)
    extra = {"generator_dir": str(generator_dir), "sampler": sampler, "num_inference_steps": num_inference_steps,
             "guidance_scale": guidance_scale}
    return report_for_samples(pipeline_sampler(pipe, sampler, num_inference_steps, guidance_scale), real_dir, n,
                              label_names=list(pipe.label_names) or None, device=device, seed=seed,
                              json_path=json_path, grid_path=grid_path, extra=extra,
                              on_step=on_step or no_progress)
