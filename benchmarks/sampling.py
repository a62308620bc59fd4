"""Sampling throughput and domain FID of the shipped generator, per sampler, against stock diffusers.

Timings (one run, interleaved so a noisy shared CPU hits every variant alike):

* one UNet call on a micro-batch: plain NCHW eager (how a diffusers user loads it), our default
  channels_last eager, and channels_last + ``torch.compile`` (``compile=True``);
* :class:`models.diffusion.CXRDiffusionPipeline` for ``ddpm`` 1000 steps (one batch only: seconds
  per image on CPU), ``ddim`` 50, ``dpmsolver++`` 20 and 10, eager and compiled, and the stock
  diffusers ``DDPMPipeline`` / ``DDIMPipeline`` on the same UNet at equal steps and batch (stock
  pipelines are unconditional: they run the null class, so they are compared with our unguided rows).

Domain FID (``--fid-images N --fid-only``): N images per sampler (label counts as in the real
reference set) against N real training images, with a real-vs-real row at the same N; samples are
cached per chunk so the hour-long 1000-step DDPM row resumes after an interruption.

    python benchmarks/sampling.py --threads 2                 # timings -> docs/results/sampling.json
    python benchmarks/sampling.py --quick                     # smaller batches, 100-step DDPM
    python benchmarks/sampling.py --fid-only --fid-images 256 --fid-guidance 1 \
        --fid-samplers ddpm-1000,ddim-50,dpmsolver++-20,dpmsolver++-10 --compile --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers.models.unets.unet_2d import UNet2DModel

from benchmarks._common import REPO_ROOT, write_result
from models.diffusion import CXRDiffusionPipeline, plan_generation

DEFAULT_GENERATOR = REPO_ROOT / "models" / "weights" / "generator-kermany-64"


class NullClassUNet(torch.nn.Module):
    """Wraps a class-conditional UNet so stock diffusers pipelines (which pass no class labels) run
    it on the null class, i.e. unconditionally. Exposes the attributes those pipelines read."""

    def __init__(self, unet: Any, null_class_id: int | None) -> None:
        super().__init__()
        self.unet = unet
        self.config = unet.config
        self.null_class_id = null_class_id

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype  # type: ignore[no-any-return]

    @property
    def device(self) -> torch.device:
        return self.unet.device  # type: ignore[no-any-return]

    def forward(self, sample: torch.Tensor, timestep: Any, **kwargs: Any) -> Any:
        labels = None
        if self.null_class_id is not None:
            labels = torch.full((sample.shape[0],), self.null_class_id, device=sample.device)
        return self.unet(sample, timestep, class_labels=labels, **kwargs)


def time_ours(pipe: CXRDiffusionPipeline, sampler: str, steps: int, n: int, batch: int, guidance: float,
              seed: int = 0) -> dict[str, Any]:
    labels: list[str | int | None] = (
        list(plan_generation(n=n, seed=seed, label_names=pipe.label_names)) if pipe.conditional else [None] * n
    )
    t0 = time.perf_counter()
    if guidance == 1.0:
        out = pipe(num_images=n, seed=seed, sampler=sampler, num_inference_steps=steps, batch_size=batch,
                   guidance_scale=1.0)
    else:
        out = pipe(labels=labels, seed=seed, sampler=sampler, num_inference_steps=steps, batch_size=batch,
                   guidance_scale=guidance)
    dt = time.perf_counter() - t0
    return {"pipeline": "cxrsynth (compiled)" if pipe.compiled else "cxrsynth", "sampler": sampler, "steps": steps,
            "guidance": guidance, "batch": batch, "images": n, "seconds": round(dt, 3), "images_per_s": n / dt,
            "s_per_image": dt / n, "_images": out.images}


def warm_up(pipe: CXRDiffusionPipeline) -> None:
    """Two short calls (unguided, guided): first-call costs (and compiles) stay out of the timings."""
    label = [pipe.label_names[0]] if pipe.conditional else None
    pipe(labels=label, num_images=None if pipe.conditional else 1, num_inference_steps=2, guidance_scale=1.0)
    if pipe.conditional:
        pipe(labels=label, num_inference_steps=2, guidance_scale=2.0)


def time_unet_calls(pipe: CXRDiffusionPipeline, pipe_c: CXRDiffusionPipeline, stock_unet: Any, repeats: int,
                    calls: int) -> list[dict[str, Any]]:
    """Milliseconds per UNet call on one micro-batch: NCHW eager (stock), channels_last eager (ours),
    channels_last compiled (ours, ``compile=True``), interleaved ``repeats`` times; median kept."""
    k = pipe.micro_batch
    dev = pipe.device
    x = torch.randn(k, 1, pipe.resolution, pipe.resolution, device=dev)
    cond = (torch.arange(k, device=dev) % max(1, len(pipe.label_names))) if pipe.conditional else None
    xc = x.contiguous(memory_format=torch.channels_last)
    variants = {"NCHW eager (stock load)": (stock_unet, x), "channels_last eager (default)": (pipe.unet, xc),
                "channels_last compiled (compile=True)": (pipe_c.unet, xc)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, (unet, inp) in variants.items():
                unet(inp, torch.tensor(999, device=dev), class_labels=cond)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for i in range(calls):
                    unet(inp, torch.tensor(900 - i, device=dev), class_labels=cond)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append((time.perf_counter() - t0) / calls)
    base = float(np.median(times["NCHW eager (stock load)"]))
    out = []
    for name, ts in times.items():
        med = float(np.median(ts))
        out.append({"unet": name, "micro_batch": k, "ms_per_call": round(1000 * med, 2),
                    "all_ms": [round(1000 * t, 1) for t in ts], "speedup_vs_nchw": base / med})
        print(f"UNet {name:40s} {1000 * med:8.1f} ms/call ({base / med:.2f}x)", flush=True)
    return out


def time_stock(pipe: CXRDiffusionPipeline, stock_unet: Any, kind: str, steps: int, n: int) -> dict[str, Any]:
    from diffusers import DDIMPipeline, DDPMPipeline
    from diffusers.schedulers.scheduling_ddim import DDIMScheduler
    from diffusers.schedulers.scheduling_ddpm import DDPMScheduler

    unet = NullClassUNet(stock_unet, pipe.null_class_id)
    if kind == "ddpm":
        stock: Any = DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(pipe.scheduler.config))
        kwargs: dict[str, Any] = {}
    else:
        stock = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(pipe.scheduler.config))
        kwargs = {"eta": 0.0}
    stock.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    with torch.inference_mode():
        stock(batch_size=n, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
              output_type="np", **kwargs)
    dt = time.perf_counter() - t0
    return {"pipeline": f"diffusers {type(stock).__name__}", "sampler": kind, "steps": steps, "guidance": 1.0,
            "batch": n, "images": n, "seconds": round(dt, 3), "images_per_s": n / dt, "s_per_image": dt / n}


def fid_for(images: np.ndarray, real: np.ndarray) -> float:
    from models.metrics import domain_fid

    return float(domain_fid(images, real))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generator", default=str(DEFAULT_GENERATOR))
    ap.add_argument("--quick", action="store_true", help="small batches (CI smoke run)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--fid-images", type=int, default=0, help="images per sampler for domain FID (0 = off)")
    ap.add_argument("--real-data", default=None, help="real ImageFolder for FID (default: shared Kermany)")
    ap.add_argument("--out", default=None, help="JSON path (default docs/results/sampling[-quick].json)")
    ap.add_argument("--fid-only", action="store_true",
                    help="measure FID only and add it under 'fid_runs' of an existing JSON (keeps timings)")
    ap.add_argument("--fid-samplers", default="ddim-50,dpmsolver++-20,dpmsolver++-10",
                    help="comma list of SAMPLER-STEPS for FID, e.g. ddpm-1000,dpmsolver++-20")
    ap.add_argument("--fid-guidance", type=float, default=2.0, help="guidance scale of the FID samples")
    ap.add_argument("--fid-labels", choices=("real", "balanced"), default="real",
                    help="synthetic label counts: as in the real reference set (default) or balanced")
    ap.add_argument("--fid-seed", type=int, default=1,
                    help="request seed of the FID samples; another seed gives a second set (FID noise)")
    ap.add_argument("--compile", action="store_true", help="FID samples from the torch.compile'd UNet")
    ap.add_argument("--cache-dir", default="~/.cache/cxrsynth/sampling_fid",
                    help="per-chunk sample cache, so a killed FID run resumes")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.fid_only:
        _fid_only(args)
        return

    pipe = CXRDiffusionPipeline.from_pretrained(args.generator, device=args.device)
    # The stock reference loads the UNet as any diffusers user would: fp32, NCHW, eager.
    stock_unet = UNet2DModel.from_pretrained(args.generator, torch_dtype=torch.float32)
    stock_unet = cast(Any, stock_unet).to(pipe.device).eval()
    cuda = pipe.device.type == "cuda"
    batch = (8 if args.quick else 32) if not cuda else (64 if args.quick else 256)
    # one micro-batch: the UNet always runs micro_batch images per call, so fewer would be padding
    ddpm_batch = pipe.micro_batch if not cuda else batch
    ddpm_steps = 100 if args.quick else 1000
    guidance = 2.0
    warm_up(pipe)
    t0 = time.perf_counter()
    pipe_c = CXRDiffusionPipeline.from_pretrained(args.generator, device=args.device, compile=True)
    warm_up(pipe_c)  # builds both graphs (unguided and guided micro-batches)
    compile_s = time.perf_counter() - t0
    print(f"torch.compile + first calls: {compile_s:.1f} s", flush=True)

    unet_calls = time_unet_calls(pipe, pipe_c, stock_unet, repeats=2 if args.quick else 5,
                                 calls=3 if args.quick else 10)

    rows: list[dict[str, Any]] = []
    plan = [("ddpm", ddpm_steps, ddpm_batch), ("ddim", 50, batch), ("dpmsolver++", 20, batch),
            ("dpmsolver++", 10, batch), ("sde-dpmsolver++", 20, batch), ("unipc", 20, batch)]
    # Ours vs stock at equal steps and batch, alternating eager / compiled / stock so that the noise
    # of a shared CPU hits all three alike; ddim is repeated and the best of each kept.
    for kind, steps, n in (("ddpm", ddpm_steps, ddpm_batch), ("ddim", 50, batch)):
        trio: dict[str, list[dict[str, Any]]] = {"ours": [], "compiled": [], "stock": []}
        for _ in range(2 if kind == "ddim" else 1):
            trio["ours"].append(time_ours(pipe, kind, steps, n, n, 1.0))
            trio["compiled"].append(time_ours(pipe_c, kind, steps, n, n, 1.0))
            trio["stock"].append(time_stock(pipe, stock_unet, kind, steps, n))
        best = {k: min(v, key=lambda r: r["seconds"]) for k, v in trio.items()}
        for k in ("ours", "compiled"):
            best[k]["ratio_vs_stock"] = best[k]["images_per_s"] / best["stock"]["images_per_s"]
        for r in best.values():
            r["repeats"] = len(trio["ours"])
            rows.append(r)
            print(f"{r['pipeline']:24s} {kind:6s} {steps:5d}: {r['images_per_s']:.3f} img/s", flush=True)
    for sampler, steps, n in plan[1:]:
        for g in ((1.0, guidance) if pipe.conditional else (1.0,)):
            if sampler == "ddim" and g == 1.0:
                continue  # measured above, against stock
            rows.append(time_ours(pipe, sampler, steps, n, n, g))
            print(f"{sampler:12s} {steps:5d} g={g}: {rows[-1]['images_per_s']:.3f} img/s", flush=True)
    if pipe.conditional:  # the service default (dpmsolver++ 20, guided) in a worker with compile_unet on
        rows.append(time_ours(pipe_c, "dpmsolver++", 20, batch, batch, guidance))

    fid: dict[str, Any] = {"images_per_sampler": 0, "note": "not measured (--fid-images 0)"}
    if args.fid_images:
        fid = measure_fid(pipe, args, batch, args.fid_guidance)

    for r in rows:
        r.pop("_images", None)
    _print_table(rows, fid, unet_calls)
    name = "sampling-quick" if args.quick else "sampling"
    out_path = Path(args.out) if args.out else REPO_ROOT / "docs" / "results" / f"{name}.json"
    # FID runs (--fid-only, an hour for DDPM) are kept when the timings are measured again.
    fid_runs = json.loads(out_path.read_text()).get("fid_runs", {}) if out_path.exists() else {}
    path = write_result(name, {
        "generator": str(Path(args.generator).relative_to(REPO_ROOT)) if Path(args.generator).resolve()
        .is_relative_to(REPO_ROOT) else args.generator,
        "device": str(pipe.device), "torch_threads": torch.get_num_threads(), "rows": rows, "fid": fid,
        "unet_calls": unet_calls, "compile_seconds": round(compile_s, 1), "fid_runs": fid_runs,
        "notes": "ddpm timed on one batch only; ours / compiled / stock alternate, ddim rows best of 2; stock "
                 "pipelines run the null class (unconditional) on a plain NCHW eager UNet and are compared with "
                 "our guidance=1 rows at the same batch and steps.",
    }, out_path)
    md = write_markdown(json.loads(path.read_text()), path.with_suffix(".md"))
    print(f"wrote {path} and {md}")


def real_sets(n: int, real_dir: Path, resolution: int) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """Two disjoint seeded random sets of ``n`` real images (the FID reference and a yardstick set)
    and the labels of the reference set."""
    from models.data.folders import images_to_array, list_image_folder

    records = list_image_folder(real_dir)
    if 2 * n > len(records):
        raise ValueError(f"{real_dir} has {len(records)} images; need {2 * n} for two disjoint sets")
    order = np.random.default_rng(0).permutation(len(records))
    ref, other = sorted(order[:n].tolist()), sorted(order[n : 2 * n].tolist())
    load = lambda idx: images_to_array([records[i].path for i in idx], resolution, "pad", threads=2)  # noqa: E731
    return load(ref), load(other), [records[i].label for i in ref]


def parse_sampler_specs(text: str) -> list[tuple[str, int]]:
    """``"ddpm-1000,dpmsolver++-20"`` -> ``[("ddpm", 1000), ("dpmsolver++", 20)]``."""
    specs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, steps = item.rpartition("-")
        if not name or not steps.isdigit():
            raise SystemExit(f"bad sampler spec {item!r}: use NAME-STEPS, e.g. ddpm-1000")
        specs.append((name, int(steps)))
    return specs


def weights_digest(generator_dir: Path) -> str:
    """Short content hash of a generator's weights: the sample cache key (new weights, new samples)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(generator_dir.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def cached_samples(pipe: CXRDiffusionPipeline, labels: list[str | None], seed: int, sampler: str, steps: int,
                   guidance: float, cache: Path, batch: int, chunk: int = 16) -> tuple[np.ndarray, dict[str, Any]]:
    """All images of a request, generated ``chunk`` indices at a time and each chunk saved to ``cache``.

    Why chunks: 1000-step DDPM costs ~12 s per image on this CPU, so a few hundred images take an
    hour; a killed run resumes from its last chunk. The pipeline's determinism contract (image i
    depends only on the seed and i) makes the resumed set identical to an uninterrupted one.
    Returns the images and timing of the chunks generated in this call (cached chunks excluded).
    """
    cache.mkdir(parents=True, exist_ok=True)
    parts: list[np.ndarray] = []
    fresh_images, fresh_seconds = 0, 0.0
    for start in range(0, len(labels), chunk):
        idx = list(range(start, min(start + chunk, len(labels))))
        path = cache / f"chunk_{start:06d}_{len(idx)}.npy"
        if path.exists():
            parts.append(np.load(path))
            continue
        t0 = time.perf_counter()
        cond = [labels[i] for i in idx]
        out = pipe(labels=cond if pipe.conditional else None, num_images=None if pipe.conditional else len(idx),
                   image_indices=idx, seed=seed, sampler=sampler, num_inference_steps=steps,
                   batch_size=min(batch, len(idx)), guidance_scale=guidance).images
        fresh_seconds += time.perf_counter() - t0
        fresh_images += len(idx)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, out)
        tmp.replace(path)  # atomic: a killed run never leaves a half-written chunk
        parts.append(out)
        print(f"  {sampler}-{steps} g={guidance:g}: {start + len(idx)}/{len(labels)} images "
              f"({fresh_seconds / fresh_images:.2f} s/image this run)", flush=True)
    timing = {"generated_now": fresh_images, "seconds_now": round(fresh_seconds, 1),
              "s_per_image_now": fresh_seconds / fresh_images if fresh_images else None}
    return np.concatenate(parts), timing


def measure_fid(pipe: CXRDiffusionPipeline, args: argparse.Namespace, batch: int, guidance: float) -> dict[str, Any]:
    """Domain FID of ``--fid-images`` images per sampler (``--fid-samplers``) vs as many real images.

    FID is biased upwards at small n, so the yardstick is computed at the same n: a second, disjoint
    real set of n images against the same reference set. The synthetic label counts equal the
    reference set's (``--fid-labels real``, default) so a label-ratio mismatch does not count as
    infidelity; ``balanced`` asks for equal counts instead. Samples are cached per chunk
    (:func:`cached_samples`), so the hour-long DDPM-1000 row can be resumed.
    """
    from models.diffusion.testing import shared_data_dir

    n = int(args.fid_images)
    real_dir = Path(args.real_data) if args.real_data else shared_data_dir() / "kermany-pneumonia"
    real, other, real_labels = real_sets(n, real_dir, pipe.resolution)
    if not pipe.conditional:
        labels: list[str | None] = [None] * n
    elif args.fid_labels == "real":
        counts = {name: sum(lab == name for lab in real_labels) for name in pipe.label_names}
        labels = plan_generation(counts={k: v for k, v in counts.items() if v}, seed=1, label_names=pipe.label_names)
    else:
        labels = plan_generation(n=n, seed=1, label_names=pipe.label_names)
    out: dict[str, Any] = {"images_per_sampler": n, "real_images": len(real), "real_source": real_dir.name,
                           "guidance": guidance, "labels": args.fid_labels,
                           "label_counts": {str(k): labels.count(k) for k in sorted(set(labels), key=str)},
                           "per_sampler": {}, "timing": {}}
    out["real_vs_real"] = fid_for(other, real)
    print(f"FID real vs real (n={n}): {out['real_vs_real']:.3f}", flush=True)
    digest = weights_digest(Path(args.generator))
    cache_root = Path(args.cache_dir).expanduser()
    for sampler, steps in parse_sampler_specs(args.fid_samplers):
        seed = int(args.fid_seed)
        key = f"{sampler}-{steps}" + (f"-seed{seed}" if seed != 1 else "")
        mode = "compiled" if pipe.compiled else "eager"
        cache = cache_root / f"{digest}-{sampler}-{steps}-g{guidance:g}-seed{seed}-n{n}-{args.fid_labels}-{mode}"
        imgs, timing = cached_samples(pipe, labels, seed, sampler, steps, guidance, cache, batch)
        out["per_sampler"][key] = fid_for(imgs, real)
        out["timing"][key] = timing
        out.setdefault("sample_caches", {})[key] = cache.name
        print(f"FID {key} g={guidance:g}: {out['per_sampler'][key]:.3f}", flush=True)
    return out


def _fid_only(args: argparse.Namespace) -> None:
    """Measure FID only and store it under ``fid_runs["g<guidance>-n<N>-<labels>"]`` of the JSON."""
    if not args.fid_images:
        raise SystemExit("--fid-only needs --fid-images N")
    path = Path(args.out) if args.out else REPO_ROOT / "docs" / "results" / "sampling.json"
    doc = json.loads(path.read_text())
    pipe = CXRDiffusionPipeline.from_pretrained(args.generator, device=args.device, compile=args.compile)
    batch = 32 if pipe.device.type == "cpu" else 256
    fid = measure_fid(pipe, args, batch, args.fid_guidance)
    fid["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    fid["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    fid["torch_threads"] = torch.get_num_threads()
    fid["unet_compiled"] = pipe.compiled
    runs = doc.setdefault("fid_runs", {})
    run_key = f"g{args.fid_guidance:g}-n{args.fid_images}-{args.fid_labels}"
    # several invocations (one slow sampler now, the fast ones later) add to one run's table
    # same run = same real sets, checked through the yardstick (equal up to float summation order)
    if run_key in runs and abs(runs[run_key].get("real_vs_real", -1.0) - fid["real_vs_real"]) < 1e-3:
        runs[run_key]["per_sampler"].update(fid["per_sampler"])
        runs[run_key]["timing"].update(fid["timing"])
        runs[run_key].setdefault("sample_caches", {}).update(fid.get("sample_caches", {}))
        runs[run_key].setdefault("commands", []).append(fid["command"])
        fid = runs[run_key]
    else:
        fid["commands"] = [fid["command"]]
        runs[run_key] = fid
    grid = path.with_name(f"{path.stem}_fid-{run_key}.png")
    fid["grid"] = grid.name
    sample_grid(fid, Path(args.cache_dir).expanduser(), grid)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    write_markdown(doc, path.with_suffix(".md"))
    _print_table(doc["rows"], fid)
    print(f"updated {path} and its .md; samples side by side in {grid}")


def sample_grid(fid: dict[str, Any], cache_root: Path, out: Path, per_row: int = 10) -> None:
    """One row per sampler of the run: its first ``per_row`` images. Same request seed, so column j
    starts from the same noise in every row (differences are the sampler's)."""
    from PIL import Image, ImageDraw

    rows = []
    for key, name in fid.get("sample_caches", {}).items():
        chunks = sorted((cache_root / name).glob("chunk_*.npy"))
        if chunks:
            rows.append((key, np.concatenate([np.load(c) for c in chunks[:2]])[:per_row]))
    if not rows:
        return
    size = rows[0][1].shape[-1]
    label_w, scale = 150, 2
    canvas = Image.new("L", (label_w + per_row * size * scale, len(rows) * size * scale), 255)
    draw = ImageDraw.Draw(canvas)
    for r, (key, imgs) in enumerate(rows):
        draw.text((6, r * size * scale + size * scale // 2 - 12), f"{key}\nFID {fid['per_sampler'][key]:.1f}", fill=0)
        for j, im in enumerate(imgs):
            tile = Image.fromarray(im).resize((size * scale, size * scale), Image.Resampling.NEAREST)
            canvas.paste(tile, (label_w + j * size * scale, r * size * scale))
    canvas.save(out)


def write_markdown(doc: dict[str, Any], out: Path) -> Path:
    """``docs/results/sampling.md`` rendered from the JSON alone, so the page never disagrees with it."""
    m = doc.get("machine", {})
    hw = m.get("gpu") or f"{m.get('cpu', '?')}, {m.get('cpu_count', '?')} cores, {m.get('mem_gib', '?')} GiB, no GPU"
    lines = [
        "# Sampling throughput and domain FID of the shipped generator", "",
        f"Generator `{doc.get('generator')}`; device `{doc.get('device')}` ({hw}); torch {m.get('torch')}, "
        f"{doc.get('torch_threads')} torch thread(s). Timings: `python benchmarks/{doc.get('command')}` on "
        f"{doc.get('date')} (commit {doc.get('commit')}). Generated from `{out.with_suffix('.json').name}` by "
        "`benchmarks/sampling.py`; do not edit by hand.", "",
    ]
    if doc.get("unet_calls"):
        lines += ["## One UNet call (one micro-batch; variants interleaved, median of the repeats)", "",
                  "| UNet | batch | ms / call | speed-up vs NCHW eager |", "|---|---|---|---|"]
        lines += [f"| {u['unet']} | {u['micro_batch']} | {u['ms_per_call']:.1f} | {u['speedup_vs_nchw']:.2f}x |"
                  for u in doc["unet_calls"]]
        lines += ["", f"First `torch.compile` (both graphs) plus first calls: {doc.get('compile_seconds')} s.", ""]
    rows = doc.get("rows", [])
    paper = next((r for r in rows if r["pipeline"] == "cxrsynth" and r["sampler"] == "ddpm"
                  and r["guidance"] == 1.0), None)
    lines += ["## Pipelines", "",
              "| pipeline | sampler | steps | guidance | batch | images/s | s / image | vs stock, equal steps | "
              f"vs DDPM-{paper['steps'] if paper else 1000} (the paper's sampler) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs_stock = f"{r['ratio_vs_stock']:.2f}x" if "ratio_vs_stock" in r else ""
        vs_paper = (f"{r['images_per_s'] / paper['images_per_s']:.0f}x"
                    if paper and r["pipeline"].startswith("cxrsynth") and r["sampler"] != "ddpm" else "")
        lines.append(f"| {r['pipeline']} | {r['sampler']} | {r['steps']} | {r['guidance']:g} | {r['batch']} | "
                     f"{r['images_per_s']:.3f} | {r['s_per_image']:.2f} | {vs_stock} | {vs_paper} |")
    lines += ["", f"Notes: {doc.get('notes', '')}", ""]
    for key, run in doc.get("fid_runs", {}).items():
        counts = ", ".join(f"{k} {v}" for k, v in run.get("label_counts", {}).items())
        lines += [f"## Domain FID, run `{key}`", "",
                  f"{run['images_per_sampler']} synthetic images per sampler (guidance {run['guidance']:g}; labels "
                  f"{counts}, as in the real set) against {run['real_images']} real `{run['real_source']}` training "
                  f"images (seeded random set); UNet {'compiled' if run.get('unet_compiled') else 'eager'}, "
                  f"{run.get('torch_threads')} torch thread(s).", "",
                  "| sampler | FID | s / image while sampling (this CPU, shared) |", "|---|---|---|"]
        for s_key, value in run["per_sampler"].items():
            t = run.get("timing", {}).get(s_key, {}).get("s_per_image_now")
            lines.append(f"| {s_key} | {value:.2f} | {'' if t is None else f'{t:.2f}'} |")
        lines += [f"| real vs real ({run['real_images']} vs a disjoint {run['real_images']}) | "
                  f"{run['real_vs_real']:.2f} | |", ""]
        lines += ["Commands:", ""] + [f"    python benchmarks/{c}" for c in run.get("commands", [])] + [""]
        if run.get("grid"):
            lines += [f"![first images per sampler, same seeds]({run['grid']})", ""]
    out.write_text("\n".join(lines))
    return out


def _print_table(rows: list[dict[str, Any]], fid: dict[str, Any], unet_calls: list[dict[str, Any]] | None = None
                 ) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)  # not the terminal's: logs and CI keep whole rows
    if unet_calls:
        ut = Table(title="UNet call, one micro-batch")
        for col in ("unet", "batch", "ms/call", "vs NCHW"):
            ut.add_column(col, justify="left" if col == "unet" else "right")
        for u in unet_calls:
            ut.add_row(u["unet"], str(u["micro_batch"]), f"{u['ms_per_call']:.1f}", f"{u['speedup_vs_nchw']:.2f}x")
        console.print(ut)

    table = Table(title="Sampling throughput")
    for col in ("pipeline", "sampler", "steps", "guidance", "batch", "img/s", "s/img", "vs stock"):
        table.add_column(col, justify="right" if col not in ("pipeline", "sampler") else "left")
    for r in rows:
        ratio = f"{r['ratio_vs_stock']:.2f}x" if "ratio_vs_stock" in r else ""
        table.add_row(r["pipeline"], r["sampler"], str(r["steps"]), f"{r['guidance']:g}", str(r["batch"]),
                      f"{r['images_per_s']:.3f}", f"{r['s_per_image']:.2f}", ratio)
    console.print(table)
    if fid.get("per_sampler"):
        ft = Table(title=f"Domain FID ({fid['images_per_sampler']} images per sampler vs {fid['real_images']} real, "
                         f"guidance {fid['guidance']:g})")
        ft.add_column("sampler")
        ft.add_column("FID", justify="right")
        for k, v in fid["per_sampler"].items():
            ft.add_row(k, f"{v:.3f}")
        ft.add_row(f"real vs real ({fid['real_images']} vs {fid['real_images']}, disjoint)",
                   f"{fid['real_vs_real']:.3f}")
        console.print(ft)


if __name__ == "__main__":
    main()
