"""Memorisation gate: throughput against the Kermany training set, catch rate of planted copies and
near-copies per perturbation, false rejections of genuine samples of the shipped generator.

Uses what ships: ``models/weights/generator-kermany-64`` with its privacy index (5,016 training images)
and calibrated thresholds. Planted images are perturbed copies of real training images
(``models.privacy.planting``); genuine images are fresh samples of the generator (DPM-Solver++ 20 steps,
guidance 2, seeded). Each row also says which test caught the copies (pixel, embedding, exact bytes).
``--scaling`` times the exact search alone on random unit vectors for growing training-set sizes.

    python benchmarks/privacy_gate.py --threads 2 --per-kind 100 --genuine 200
    python benchmarks/privacy_gate.py --quick          # 20 per kind, 32 genuine
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import REPO_ROOT, RESULTS_DIR, write_result
from models.privacy import MemorisationGate
from models.privacy.planting import PERTURBATIONS, plant_copies
from models.privacy.scoring import score_images
from models.privacy.search import nearest_neighbours

DEFAULT_GENERATOR = REPO_ROOT / "models" / "weights" / "generator-kermany-64"
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "kermany-pneumonia"


def _rates(gate: MemorisationGate, images: np.ndarray) -> dict[str, np.ndarray]:
    res = gate.check(images)
    t = gate.thresholds
    return {"rejected": ~res.passed, "pixel": res.pixel_similarity > t["pixel"],
            "embedding": res.embedding_similarity > t["embedding"], "exact": res.exact_copy,
            "pixel_similarity": res.pixel_similarity, "embedding_similarity": res.embedding_similarity,
            "pixel_neighbour": res.pixel_neighbour}


def sample_genuine(generator: Path, n: int, seed: int) -> np.ndarray:
    """``n`` guided samples of the generator (DPM-Solver++ 20 steps), labels balanced."""
    from models.diffusion.pipeline import CXRDiffusionPipeline, plan_generation

    pipe = CXRDiffusionPipeline.from_pretrained(generator, device="auto")
    labels = plan_generation(n=n, seed=seed, label_names=pipe.label_names)
    return np.asarray(pipe(labels=labels, seed=seed, num_inference_steps=20, guidance_scale=2.0).images)


def baselines(train: np.ndarray, patients: list[str], planted: np.ndarray, kinds: list[str], genuine: np.ndarray,
              quantile: float, device: str) -> list[dict[str, Any]]:
    """The same calibration and planted set with simpler detectors, to show what each design choice buys:
    plain 32x32 NCC (no shift search, no flip) and the reference classifier's features as the embedding."""
    import torch.nn.functional as F

    from models.privacy.embedding import load_embedder
    from models.privacy.index import image_digests, pair_exclusion_keys
    from models.privacy.scoring import EmbeddingSpace

    keys = pair_exclusion_keys(image_digests(train), patients)

    def plain_ncc(images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images)).float().div(255).unsqueeze(1)
        v = F.adaptive_avg_pool2d(x, 32).flatten(1)
        return F.normalize(v - v.mean(1, keepdim=True), dim=1)

    reference = load_embedder("reference-classifier-64", device=device)
    space = EmbeddingSpace.fit(reference(train))

    def reference_features(images: np.ndarray) -> torch.Tensor:
        return space(reference(np.ascontiguousarray(images)))

    rows = []
    for name, featurize, flip in (("plain NCC 32x32, no shift search, no flip", plain_ncc, False),
                                  ("reference-classifier embedding (as the gate: centred, PCA 128, flip)",
                                   reference_features, True)):
        index = featurize(train)

        def nn(images: np.ndarray, groups: np.ndarray | None = None,
               featurize: Any = featurize, flip: bool = flip, index: torch.Tensor = index) -> np.ndarray:
            views = [images, images[:, :, ::-1]] if flip else [images]
            return np.max([nearest_neighbours(featurize(v), index, query_groups=groups,
                                              index_groups=None if groups is None else keys).similarity
                           for v in views], axis=0)

        threshold = float(np.quantile(nn(train, keys), quantile))
        sims = nn(planted)
        k = np.array(kinds)
        rows.append({"detector": name, "threshold": threshold,
                     "catch_rate": {kind: float((sims[k == kind] > threshold).mean()) for kind in PERTURBATIONS},
                     "false_rejection_rate": float((nn(genuine) > threshold).mean())})
        print(f"baseline {name}: {rows[-1]}", flush=True)
    return rows


def search_scaling(sizes: list[int], queries: int, dim: int = 196, variants: int = 162) -> list[dict[str, Any]]:
    """Seconds per query image of the pixel search alone (``variants`` shifted views) vs training-set size."""
    rows = []
    rng = np.random.default_rng(0)
    for n in sizes:
        index = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(n, dim))).float(), dim=1).half()
        q = torch.nn.functional.normalize(torch.from_numpy(rng.normal(size=(queries * variants, dim))).float(), dim=1)
        t0 = time.perf_counter()
        nearest_neighbours(q, index)
        dt = time.perf_counter() - t0
        rows.append({"training_images": n, "query_images": queries, "seconds_per_image": dt / queries,
                     "images_per_s": queries / dt, "index_mib_fp16": round(n * dim * 2 / 2**20, 2)})
        print(f"search scaling: N={n:>7d}  {queries / dt:8.1f} img/s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generator", type=Path, default=DEFAULT_GENERATOR)
    ap.add_argument("--train-data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--per-kind", type=int, default=100, help="planted images per perturbation")
    ap.add_argument("--genuine", type=int, default=200, help="genuine generator samples")
    ap.add_argument("--throughput-images", type=int, default=256)
    ap.add_argument("--scaling", default="5000,20000,100000",
                    help="training-set sizes for the search timing ('' = skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compare-threads", default="2", help="also time the check with these thread counts")
    ap.add_argument("--no-baselines", action="store_true", help="skip the plain-NCC / reference-classifier rows")
    ap.add_argument("--quick", action="store_true", help="20 per kind, 32 genuine, 64 throughput images")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.per_kind, args.genuine, args.throughput_images = 20, 32, 64
    torch.set_num_threads(args.threads)
    from models.privacy.index import load_training_folder

    t0 = time.perf_counter()
    gate = MemorisationGate.from_generator_dir(args.generator, device=args.device)
    res = gate.index.resolution
    train, _, patients, _ = load_training_folder(args.train_data, res)
    print(f"gate over {len(gate.index)} training images, thresholds {gate.thresholds}; "
          f"{len(train)} images loaded in {time.perf_counter() - t0:.1f}s", flush=True)
    if len(train) != len(gate.index):
        raise SystemExit(f"{args.train_data} has {len(train)} images; the index {len(gate.index)}")

    # --- throughput: the whole check (both spaces, exact-copy test) on planted + training images
    probe = plant_copies(train, max(1, args.throughput_images // len(PERTURBATIONS)), seed=args.seed + 1)[0]
    probe = probe[: args.throughput_images]
    gate.check(probe[:8])  # warm-up
    t = time.perf_counter()
    gate.check(probe)
    total_s = time.perf_counter() - t
    t = time.perf_counter()
    for oriented in (probe, np.ascontiguousarray(probe[:, :, ::-1])):
        gate.embedder(oriented)
    embed_s = time.perf_counter() - t
    t = time.perf_counter()
    score_images(probe, gate.index.pixel, gate.index.embedding, _NoEmbed(gate.index.embedding.shape[1]),
                 _Identity(), device="cpu")
    pixel_s = time.perf_counter() - t
    throughput = {"images": len(probe), "training_images": len(gate.index), "seconds": round(total_s, 2),
                  "images_per_s": round(len(probe) / total_s, 2),
                  "embedding_network_s": round(embed_s, 2), "pixel_search_s": round(pixel_s, 2),
                  "load_average_1min": round(os.getloadavg()[0], 2)}
    other_threads = {}
    for n in (int(x) for x in args.compare_threads.split(",") if x):
        torch.set_num_threads(n)
        t = time.perf_counter()
        gate.check(probe)
        other_threads[str(n)] = round(len(probe) / (time.perf_counter() - t), 2)
    torch.set_num_threads(args.threads)
    throughput["images_per_s_with_threads"] = other_threads
    print(f"throughput: {throughput['images_per_s']} img/s ({throughput})", flush=True)

    # --- planted copies and near-copies
    planted, kinds, sources = plant_copies(train, args.per_kind, seed=args.seed)
    pr = _rates(gate, planted)
    kinds_arr = np.array(kinds)
    same_source = np.array([gate.index.sha256[n] == gate.index.sha256[s]
                            for n, s in zip(pr["pixel_neighbour"], sources, strict=True)])
    per_kind = []
    for kind in PERTURBATIONS:
        m = kinds_arr == kind
        per_kind.append({"perturbation": kind, "n": int(m.sum()), "catch_rate": float(pr["rejected"][m].mean()),
                         "by_pixel": float(pr["pixel"][m].mean()), "by_embedding": float(pr["embedding"][m].mean()),
                         "by_exact_bytes": float(pr["exact"][m].mean()),
                         "nearest_is_source": float(same_source[m].mean()),
                         "min_pixel_similarity": float(pr["pixel_similarity"][m].min()),
                         "median_embedding_similarity": float(np.median(pr["embedding_similarity"][m]))})
        print(f"{kind:22s} caught {per_kind[-1]['catch_rate']:.3f} (pixel {per_kind[-1]['by_pixel']:.3f}, "
              f"embedding {per_kind[-1]['by_embedding']:.3f})", flush=True)
    listed = [r for r in per_kind if r["perturbation"] != "shift+contrast+noise"]
    overall = float(pr["rejected"].mean())

    # --- genuine samples
    t = time.perf_counter()
    genuine = sample_genuine(args.generator, args.genuine, seed=args.seed + 100)
    sample_s = time.perf_counter() - t
    gr = _rates(gate, genuine)
    genuine_row = {"n": args.genuine, "false_rejection_rate": float(gr["rejected"].mean()),
                   "by_pixel": float(gr["pixel"].mean()), "by_embedding": float(gr["embedding"].mean()),
                   "exact_copies": int(gr["exact"].sum()),
                   "pixel_similarity": {q: float(np.quantile(gr["pixel_similarity"], p))
                                        for q, p in (("median", 0.5), ("p99", 0.99), ("max", 1.0))},
                   "embedding_similarity": {q: float(np.quantile(gr["embedding_similarity"], p))
                                            for q, p in (("median", 0.5), ("p99", 0.99), ("max", 1.0))},
                   "sampling_seconds": round(sample_s, 1)}
    print(f"genuine: false rejection {genuine_row['false_rejection_rate']:.3f} of {args.genuine}", flush=True)

    # --- report PNG of the genuine samples (what a dataset's privacy report looks like)
    from models.privacy.report import ImageVerdict, privacy_report, write_privacy_png

    res_g = gate.check(genuine)
    verdicts = [ImageVerdict(i, f"{i:07d}.png", float(res_g.pixel_similarity[i]), float(res_g.embedding_similarity[i]),
                             int(res_g.pixel_neighbour[i]), int(res_g.embedding_neighbour[i]), bool(res_g.passed[i]),
                             bool(res_g.exact_copy[i])) for i in range(len(genuine))]
    report = privacy_report(verdicts, gate.index, gate.calibration, audit=True,
                            subject={"images": f"{args.genuine} genuine samples, seed {args.seed + 100}"})
    png = (args.out.parent if args.out else RESULTS_DIR) / "privacy_gate_genuine.png"
    write_privacy_png(png, report, gate.index, verdicts, lambda p: genuine[p], lambda row: train[row])

    base = []
    if not args.no_baselines:
        base = baselines(train, patients, planted, kinds, genuine, gate.calibration.quantile, args.device)
    scaling = search_scaling([int(s) for s in args.scaling.split(",") if s], queries=16) if args.scaling else []
    payload = {
        "generator": str(args.generator.relative_to(REPO_ROOT) if args.generator.is_relative_to(REPO_ROOT)
                         else args.generator),
        "threads": args.threads, "device": args.device, "cpu_count": os.cpu_count(),
        "thresholds": gate.thresholds, "quantile": gate.calibration.quantile,
        "calibration": gate.calibration.reference, "features": gate.calibration.features,
        "throughput": throughput,
        "planted": {"per_kind": per_kind, "overall_catch_rate": overall,
                    "listed_kinds_catch_rate": float(np.mean([r["catch_rate"] for r in listed])),
                    "n": len(planted), "seed": args.seed},
        "genuine": genuine_row,
        "baselines": base,
        "search_scaling": scaling,
        "report_png": png.name,
    }
    path = write_result("privacy_gate", payload, args.out)
    command = " ".join(["python", "benchmarks/privacy_gate.py", *(argv or sys.argv[1:])])
    _write_markdown(path.with_suffix(".md"), payload, command)
    print(f"wrote {path} and {path.with_suffix('.md')}")


class _Identity:
    """Embedding space stand-in: the pixel-only timing feeds zero features."""

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return features


class _NoEmbed:
    """Embedder stand-in returning zeros (times the pixel search alone)."""

    def __init__(self, dims: int) -> None:
        self.dims = dims
        self.spec = {"name": "none"}

    def __call__(self, images: np.ndarray) -> torch.Tensor:
        return torch.zeros(len(images), self.dims)


def _baseline_lines(rows: list[dict[str, Any]]) -> list[str]:
    kinds = list(rows[0]["catch_rate"])
    out = ["## Baselines: simpler detectors, same calibration (quantile of leave-one-out over the training set)",
           "", "| detector | threshold | " + " | ".join(kinds) + " | genuine rejected |",
           "|---|---|" + "---|" * len(kinds) + "---|"]
    for r in rows:
        out.append(f"| {r['detector']} | {r['threshold']:.4f} | "
                   + " | ".join(f"{r['catch_rate'][k]:.1%}" for k in kinds) + f" | {r['false_rejection_rate']:.1%} |")
    return [*out, "", "Why the gate aligns the pixel comparison (shift search, flip, centre crop) and uses a "
            "copy-detection encoder rather than the reference classifier.", ""]


def _write_markdown(path: Path, p: dict[str, Any], command: str) -> None:
    t, g, th = p["throughput"], p["genuine"], p["thresholds"]
    lines = [
        "# Memorisation gate: catch rate, false rejections, throughput",
        "",
        f"Generator `{p['generator']}`; privacy index of {t['training_images']:,} training images; thresholds "
        f"pixel {th['pixel']:.4f}, embedding {th['embedding']:.4f} (quantile {p['quantile']} of "
        f"{p['calibration']['num_reference_images']:,} real-vs-train similarities: {p['calibration']['source']}, "
        f"excluding {p['calibration']['excluded_pairs']}). {p['threads']} CPU thread(s), device {p['device']}. "
        "Raw numbers, commit and machine: `privacy_gate.json`.",
        "",
        f"Command: `{command}`",
        "",
        f"- pixel: {p['features']['pixel']}",
        f"- embedding: {p['features']['embedding']}",
        "",
        f"## Planted copies and near-copies of training images ({p['planted']['n']} images, "
        f"{p['planted']['per_kind'][0]['n']} per kind)",
        "",
        "| perturbation | caught | by pixel test | by embedding test | exact bytes | nearest = source | "
        "min pixel sim | median emb sim |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in p["planted"]["per_kind"]:
        lines.append(f"| {r['perturbation']} | {r['catch_rate']:.1%} | {r['by_pixel']:.1%} | {r['by_embedding']:.1%} "
                     f"| {r['by_exact_bytes']:.1%} | {r['nearest_is_source']:.1%} | {r['min_pixel_similarity']:.4f} | "
                     f"{r['median_embedding_similarity']:.4f} |")
    lines += [
        "",
        f"Overall catch rate {p['planted']['overall_catch_rate']:.1%}.",
        "",
        f"## Genuine samples ({g['n']} images, DPM-Solver++ 20 steps, guidance 2)",
        "",
        f"False rejection rate {g['false_rejection_rate']:.1%} (pixel test {g['by_pixel']:.1%}, embedding test "
        f"{g['by_embedding']:.1%}, exact copies {g['exact_copies']}). Nearest-training similarity: pixel median "
        f"{g['pixel_similarity']['median']:.4f}, max {g['pixel_similarity']['max']:.4f}; embedding median "
        f"{g['embedding_similarity']['median']:.4f}, max {g['embedding_similarity']['max']:.4f}.",
        f"Report of these samples: `{p['report_png']}`.",
        "",
        *(_baseline_lines(p["baselines"]) if p["baselines"] else []),
        "## Throughput (CPU)",
        "",
        f"{t['images_per_s']:.1f} images/s for the whole check against {t['training_images']:,} training images "
        f"({t['images']} images in {t['seconds']} s; of which embedding network {t['embedding_network_s']} s, "
        f"pixel search {t['pixel_search_s']} s), {p['threads']} torch thread(s), 1-minute load average "
        f"{t['load_average_1min']} on {p.get('cpu_count', '?')} cores."
        + "".join(f" With {n} threads: {v:.1f} images/s." for n, v in t["images_per_s_with_threads"].items())
        + (" On a busy CPU torch's OpenMP threads mostly wait on each other: give each worker process one thread."
           if any(v < t["images_per_s"] for v in t["images_per_s_with_threads"].values()) else ""),
    ]
    if p["search_scaling"]:
        lines += ["", "Exact pixel search alone (162 shifted/flipped views x 196 dims per image) vs training-set size, "
                  "random unit vectors:", "", "| training images | images/s | index size (fp16) |", "|---|---|---|"]
        lines += [f"| {r['training_images']:,} | {r['images_per_s']:.1f} | {r['index_mib_fp16']} MiB |"
                  for r in p["search_scaling"]]
        lines += ["", "Cost grows with the training set, a little faster than linearly once the index no longer fits "
                  "in the CPU cache. At 10^6 training images an exact search would take seconds per image on a CPU: "
                  "switch to an approximate index (FAISS IVF-PQ or HNSW on the same normalised vectors), re-rank its "
                  "top candidates exactly, and calibrate with the same search."]
    seconds = p["calibration"].get("seconds")
    if seconds is not None:
        lines += ["", f"Building and calibrating the shipped index (`cxrsynth privacy-index`, leave-one-out over "
                  f"{p['calibration']['num_training_images']:,} images) took {seconds} s (recorded in "
                  "`privacy_calibration.json`)."]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
