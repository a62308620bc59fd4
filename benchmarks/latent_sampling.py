"""Sampling speed of a latent (224-256 px) generator: UNet and decoder timed apart, ours vs stock diffusers.

Rows, interleaved in one process so a noisy shared CPU hits every variant alike (median of rounds):

* one UNet call on a guided micro-batch (2 x 8 latents): plain NCHW (how a diffusers user loads it) and
  our channels_last default;
* one decoder call on 8 latents: NCHW vs channels_last;
* end to end, DPM-Solver++ 20 steps, guidance 2, decode included, ``--n`` images:
  :class:`models.diffusion.CXRDiffusionPipeline` vs a stock diffusers loop over the same components
  (``DPMSolverMultistepScheduler`` + classifier-free guidance + ``AutoencoderKL.decode``, NCHW, batch 8).

``--generator DIR`` times a trained generator; ``--architecture 224`` times the shipped architecture with
random weights (speed does not depend on the weight values), before a model exists.

    .venv/bin/python benchmarks/latent_sampling.py --generator models/weights/generator-kermany-224 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, cast

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, write_result
from models.diffusion.pipeline import CXRDiffusionPipeline, make_scheduler


def _pipeline(args: argparse.Namespace) -> CXRDiffusionPipeline:
    if args.generator:
        pipe = CXRDiffusionPipeline.from_pretrained(args.generator, device="cpu")
        if pipe.vae is None:
            raise SystemExit(f"{args.generator} is not a latent generator")
        return pipe
    from models.diffusion.autoencoder import build_vae
    from models.diffusion.latent import LatentGeneratorConfig
    from models.diffusion.training import build_noise_scheduler, build_unet

    cfg = LatentGeneratorConfig.for_resolution(args.architecture)
    torch.manual_seed(0)
    vae = build_vae(cfg.autoencoder)
    vae.register_to_config(scaling_factor=1.0, shift_factor=0.0)
    return CXRDiffusionPipeline(build_unet(cfg.unet, 2), build_noise_scheduler(cfg.unet), ("normal", "pneumonia"),
                                vae=vae)


def _stock_copy(module: Any) -> Any:
    """The same weights in plain NCHW layout, as ``from_pretrained`` gives them."""
    copy = type(module).from_config(module.config)
    copy.load_state_dict(module.state_dict())
    return copy.eval().to(memory_format=torch.contiguous_format)


def _median_s(fn: Any, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.inference_mode()
def stock_loop(unet: Any, vae: Any, scheduler_config: Any, labels: list[int], null: int, steps: int,
               guidance: float, batch: int = 8) -> torch.Tensor:
    """What a diffusers user writes: DPM-Solver++ with CFG in one batch, then decode; NCHW."""
    out = []
    for s in range(0, len(labels), batch):
        lab = torch.tensor(labels[s : s + batch])
        sched = make_scheduler(scheduler_config, "dpmsolver++")
        sched.set_timesteps(steps)
        c, size = unet.config.in_channels, unet.config.sample_size
        x = torch.randn(len(lab), c, size, size, generator=torch.Generator().manual_seed(s))
        for t in sched.timesteps:
            pred = unet(torch.cat([x, x]), t, class_labels=torch.cat([lab, torch.full_like(lab, null)])).sample
            cond, uncond = pred.chunk(2)
            x = sched.step(uncond + guidance * (cond - uncond), t, x).prev_sample
        z = x / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        out.append(vae.decode(z).sample)
    return torch.cat(out)


@torch.inference_mode()
def measure(pipe: CXRDiffusionPipeline, n: int, rounds: int) -> dict[str, Any]:
    """The three tables (see the module docstring)."""
    assert pipe.vae is not None
    unet_cl, vae_cl = pipe.unet, pipe.vae
    unet_st, vae_st = _stock_copy(unet_cl), _stock_copy(vae_cl)
    k, c, size = pipe.micro_batch, pipe.sample_channels, pipe.sample_size
    x = torch.randn(2 * k, c, size, size)
    t = torch.tensor(500)
    y = torch.randint(0, 3, (2 * k,))
    z = torch.randn(k, c, size, size)
    xc, zc = x.contiguous(memory_format=torch.channels_last), z.contiguous(memory_format=torch.channels_last)
    calls = {
        "unet NCHW (stock load)": lambda: unet_st(x, t, class_labels=y),
        "unet channels_last (ours)": lambda: unet_cl(xc, t, class_labels=y),
        "decoder NCHW (stock load)": lambda: vae_st.decode(z),
        "decoder channels_last (ours)": lambda: vae_cl.decode(zc),
    }
    for fn in calls.values():
        fn()  # warm-up: oneDNN picks kernels on the first call
    per: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            per[name].append(_median_s(fn, 1))
    call_rows = [{"call": name, "ms": 1000 * statistics.median(v), "images": 2 * k if "unet" in name else k}
                 for name, v in per.items()]
    labels = [i % 2 for i in range(n)]
    names: list[str | int | None] = [pipe.label_names[i] for i in labels]
    ours, stock = [], []
    for _ in range(max(1, rounds // 2)):
        ours.append(_median_s(lambda: pipe(labels=names, seed=0, num_inference_steps=20, guidance_scale=2.0), 1))
        stock.append(_median_s(lambda: stock_loop(unet_st, vae_st, pipe.scheduler.config, labels,
                                                  int(cast(int, pipe.null_class_id)), 20, 2.0), 1))
    e2e = [{"pipeline": "CXRDiffusionPipeline (ours)", "img_s": n / statistics.median(ours)},
           {"pipeline": "stock diffusers loop, same components", "img_s": n / statistics.median(stock)}]
    decode_share = (statistics.median(per["decoder channels_last (ours)"]) / k * n) / statistics.median(ours)
    return {"calls": call_rows, "end_to_end": e2e, "speedup": e2e[0]["img_s"] / e2e[1]["img_s"],
            "decode_share_of_ours": decode_share, "n": n, "micro_batch": k,
            "latent": [c, size, size], "resolution": pipe.resolution}


def render(doc: dict[str, Any]) -> str:
    """Markdown of a result JSON."""
    lines = [f"# Latent sampling at {doc['resolution']} px", "",
             f"`{doc['command']}` (commit `{doc['commit'][:10]}`, {doc['machine'].get('cpu')}, "
             f"{doc['threads']} torch threads; {doc['source']}). Latents {doc['latent']}.", "",
             "| call | images | ms (median) |", "|---|---|---|"]
    lines += [f"| {r['call']} | {r['images']} | {r['ms']:.1f} |" for r in doc["calls"]]
    lines += ["", f"End to end, {doc['n']} images, DPM-Solver++ 20 steps, guidance 2, decode included:", "",
              "| pipeline | img/s |", "|---|---|"]
    lines += [f"| {r['pipeline']} | {r['img_s']:.2f} |" for r in doc["end_to_end"]]
    lines += ["", f"Ours vs stock: {doc['speedup']:.2f}x; decoding is {100 * doc['decode_share_of_ours']:.0f} % "
              "of our time."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--generator", default=None, help="a latent generator folder")
    src.add_argument("--architecture", type=int, choices=(224, 256), help="random weights of the default shapes")
    ap.add_argument("--n", type=int, default=16, help="images per end-to-end run")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "latent_sampling.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe = _pipeline(args)
    payload = {**measure(pipe, args.n, args.rounds), "threads": args.threads,
               "source": f"generator {Path(args.generator).name}" if args.generator
               else f"random weights, {args.architecture} px default architecture"}
    path = write_result("latent_sampling", payload, args.out)
    import json

    text = render(json.loads(path.read_text()))
    path.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
