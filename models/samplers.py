"""The registry of samplers: every sampler name, the diffusers scheduler it rebuilds and its default steps.

One list, read by the pipeline (:func:`models.diffusion.pipeline.make_scheduler`), the API schema
(``GenerationRequest.sampler``, an OpenAPI enum), the console's form and the CLI's ``--sampler`` help.
Light (no torch, no diffusers: ``models.diffusion`` imports both), like :mod:`models.generator_kinds`, so
the API reads it without loading the ML stack. Adding a sampler is one entry here (plus, for a scheduler
class not used yet, its import in ``models/diffusion/pipeline.py``). An unknown name fails loudly.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, get_args


class SamplerSpec(NamedTuple):
    """How a sampler is built from the trained scheduler's config."""

    scheduler: str  #: diffusers scheduler class name (resolved in ``models.diffusion.pipeline``)
    config: dict[str, Any]  #: overrides of the trained scheduler's config
    default_steps: int  #: denoising steps when a request gives none


#: sampler name -> spec, in the order the API and the CLI list them
SAMPLERS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec("DDPMScheduler", {}, 1000),
    # eta = 0 (deterministic DDIM); "trailing" spacing reaches t = T-1, where v-prediction on a
    # cosine schedule starts from (almost) pure noise.
    "ddim": SamplerSpec("DDIMScheduler", {"timestep_spacing": "trailing", "set_alpha_to_one": True}, 50),
    "dpmsolver++": SamplerSpec(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "timestep_spacing": "trailing",
         "lower_order_final": True, "final_sigmas_type": "zero"}, 20),
    "unipc": SamplerSpec("UniPCMultistepScheduler", {"solver_order": 2, "timestep_spacing": "trailing",
                                                     "lower_order_final": True}, 20),
    # Stochastic DPM-Solver++ (SDE): fresh noise each step, like DDPM's ancestral sampler, from the
    # image's own generator.
    "sde-dpmsolver++": SamplerSpec(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "timestep_spacing": "trailing",
         "lower_order_final": True, "final_sigmas_type": "zero"}, 20),
}
#: steps per sampler when a request gives none
DEFAULT_STEPS: dict[str, int] = {name: spec.default_steps for name, spec in SAMPLERS.items()}

# For typing only; the check below keeps it equal to the registry.
SamplerName = Literal["ddpm", "ddim", "dpmsolver++", "unipc", "sde-dpmsolver++"]
DEFAULT_SAMPLER: SamplerName = "dpmsolver++"
if get_args(SamplerName) != tuple(SAMPLERS) or DEFAULT_SAMPLER not in SAMPLERS:
    raise RuntimeError(f"models.samplers: the SamplerName literal {get_args(SamplerName)} differs from SAMPLERS "
                       f"{tuple(SAMPLERS)} (or the default is not in it)")


def check_sampler(name: str) -> SamplerSpec:
    """The spec of sampler ``name``; ``ValueError`` naming the known samplers for any other name."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}") from None


def sampler_help() -> str:
    """The sampler names as the CLI's ``--sampler`` help lists them."""
    return " | ".join(SAMPLERS) + "."
