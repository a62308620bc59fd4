"""Generator quality side by side: domain FID, PRDC, diversity and label fidelity of one or more generator
folders under the same seeds and protocol, each next to the real-vs-real yardstick at the same n.

Protocol: ``--n`` guided samples per generator (DPM-Solver++ 20 steps, guidance 2 by default, seed 0) with
labels in the real folder's class balance, against ``--real-n`` seeded real images split by patient into a
reference half and a yardstick half (``models.metrics.report.generator_report``). ``--samples NAME=NPZ``
scores an already sampled set instead (an ``images.npz`` with ``images`` and ``labels`` as written by
``benchmarks/paper_table.py``), so a large set made for another experiment is not sampled twice.

    python benchmarks/generator_quality.py --generator phase1=/path/old \
        --generator phase2=models/weights/generator-kermany-64 --n 320
    python benchmarks/generator_quality.py --samples phase2-n1000=~/.cache/.../images.npz --n 1000
    python benchmarks/generator_quality.py --resolution 224 --generator latent=models/weights/generator-kermany-224 \
        --generator upscaled-64=models/weights/generator-kermany-64 --n 500 --real-n 1000

``--resolution`` (default 64) is the size every row is compared at: real images are loaded at it, and a
generator that makes smaller images is upscaled to it (PIL bicubic), which is the baseline a 224 px
generator must beat. Every row also reports the share of spectral power above 40 cycles per image as a
fraction of the real images' share (``models.metrics.spectrum``): upscaled images lack fine detail. FID,
PRDC and label fidelity use the shipped 64 px reference classifier (images are resized to 64 px for it), or
the one given with ``--reference DIR`` (e.g. a 128 px one from ``python -m models.metrics.reference``).

Prints a table and writes ``docs/results/generator_quality.json`` (+ one sample/real grid PNG per row).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, write_result

DEFAULT_REAL = Path(os.environ.get("CXR_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data")) / \
    "kermany-pneumonia"


def _resize(images: np.ndarray, size: int) -> np.ndarray:
    """(N, h, w) uint8 -> (N, size, size) with PIL bicubic (the upscaled baseline)."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im, mode="L").resize((size, size), Image.Resampling.BICUBIC))
                     for im in images])


def _named(items: list[str], what: str) -> list[tuple[str, Path]]:
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name, item
        p = Path(path).expanduser()
        if not p.exists():
            raise SystemExit(f"{what} not found: {p}")
        out.append((name, p))
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generator", action="append", default=[], help="NAME=DIR of a generator (repeatable)")
    ap.add_argument("--samples", action="append", default=[], help="NAME=NPZ of sampled images (repeatable)")
    ap.add_argument("--real", default=str(DEFAULT_REAL), help="real ImageFolder (default: shared Kermany)")
    ap.add_argument("--n", type=int, default=320, help="synthetic images per row")
    ap.add_argument("--real-n", type=int, default=2000, help="real images (two patient-disjoint halves)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resolution", type=int, default=64, help="size the rows are compared at (see above)")
    ap.add_argument("--reference", default=None,
                    help="reference classifier folder for FID / PRDC / label fidelity (default: the shipped 64 px)")
    ap.add_argument("--out", default=str(RESULTS_DIR / "generator_quality.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.generator and not args.samples:
        ap.error("give at least one --generator or --samples")

    from models.data.folders import list_image_folder
    from models.diffusion.pipeline import CXRDiffusionPipeline
    from models.diffusion.training import load_training_data
    from models.metrics.reference import load_reference_classifier
    from models.metrics.report import generator_report
    from models.metrics.spectrum import high_frequency_share

    classifier = load_reference_classifier(args.reference)

    td = load_training_data(args.real, args.resolution, "pad")
    recs = list_image_folder(args.real)
    assert len(recs) == len(td.images) and td.labels is not None
    names = list(td.label_names)
    idx = np.sort(np.random.default_rng(args.seed).choice(len(td.images), min(args.real_n, len(td.images)),
                                                          replace=False))
    pids = [recs[i].patient_id for i in idx]
    # Labels in the real class balance, shuffled with the seed (same plan for every generator).
    counts = np.bincount(td.labels, minlength=len(names))
    per_label = np.round(counts / counts.sum() * args.n).astype(int)
    per_label[-1] = args.n - per_label[:-1].sum()
    plan = [names[k] for k in range(len(names)) for _ in range(per_label[k])]
    plan = [plan[i] for i in np.random.default_rng(args.seed + 1).permutation(len(plan))]

    sets: list[tuple[str, np.ndarray, np.ndarray, dict[str, Any]]] = []
    for name, gdir in _named(args.generator, "generator"):
        pipe = CXRDiffusionPipeline.from_pretrained(gdir, device="auto")
        out = pipe(labels=plan, seed=args.seed, sampler="dpmsolver++", num_inference_steps=args.steps,
                   guidance_scale=args.guidance)
        images = np.asarray(out.images)
        info: dict[str, Any] = {"generator": str(gdir), "kind": pipe.kind, "sampler": "dpmsolver++",
                                "steps": args.steps, "guidance": args.guidance, "seed": args.seed}
        if images.shape[-1] != args.resolution:
            info["upscaled_from"] = int(images.shape[-1])
            images = _resize(images, args.resolution)
        sets.append((name, images, np.array([names.index(p) for p in plan]), info))
    for name, npz in _named(args.samples, "samples"):
        z = np.load(npz)
        labels = [str(x) for x in z["labels"][: args.n]]
        sets.append((name, z["images"][: args.n], np.array([names.index(x) for x in labels]),
                     {"samples": str(npz)}))

    rows: dict[str, Any] = {}
    out_path = Path(args.out)
    real_hf = high_frequency_share(td.images[idx])
    for name, images, labels, info in sets:
        rep = generator_report(images, labels, td.images[idx], td.labels[idx], names, real_patient_ids=pids,
                               seed=args.seed, grid_path=out_path.with_name(f"{out_path.stem}-{name}.png"),
                               classifier=classifier)
        rows[name] = {**info, "n": len(images), "synthetic_vs_real": rep["rows"]["synthetic_vs_real"],
                      "real_vs_real": rep["rows"]["real_vs_real"],
                      "hf_share_vs_real": high_frequency_share(images) / real_hf}

    print(f"{'row':<16} {'n':>5} {'FID':>7} {'real-real':>9} {'prec':>6} {'recall':>6} {'cover':>6} "
          f"{'MS-SSIM n/p':>12} {'label AUC':>9} {'HF vs real':>10}")
    for name, r in rows.items():
        s, rr = r["synthetic_vs_real"], r["real_vs_real"]
        div = "/".join(f"{s['diversity'][k]['ms_ssim_mean']:.3f}" for k in names)
        print(f"{name:<16} {s['n']:>5} {s['fid']:>7.2f} {rr['fid']:>9.2f} {s['precision']:>6.3f} {s['recall']:>6.3f} "
              f"{s['coverage']:>6.3f} {div:>12} {s['label_fidelity']['auc']:>9.4f} {r['hf_share_vs_real']:>10.2f}")
    path = write_result("generator_quality", {"real": args.real, "real_n": len(idx), "resolution": args.resolution,
                                              "reference_classifier": args.reference or "reference-classifier-64",
                                              "reference_resolution": classifier.config.resolution,
                                              "real_hf_share": real_hf, "rows": rows}, out_path)
    print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main()
