"""Autoencoder of the latent generators: reconstruction of held-out patients, and its CPU cost.

Rows (same held-out images, whole patients the autoencoder never saw, at full size):

* each autoencoder given (``--vae NAME=DIR`` exported, or ``--checkpoint NAME=DIR`` mid-training);
* a bicubic round trip through 64 px (the best a 64 px generator plus upscaling can do) and through the
  latent grid's size (56 px at 224: same number of positions as the latent, 1 channel instead of 4).

Columns: PSNR and SSIM (torchmetrics), the share of spectral power above 40 cycles per image as a
fraction of the real images' share (detail kept), and domain FID of reconstructions vs originals in the
shipped reference classifier's features (a 64 px classifier: it sees coarse anatomy, not fine detail).

``--speed`` also times encode and decode at full size with and without the mid-block self-attention
(random weights of the same shapes; interleaved rounds, median), which decides ``mid_block_attention``.

    .venv/bin/python benchmarks/autoencoder.py --vae ae=models/weights/generator-kermany-224/vae \
        --data ../shared/data/kermany-pneumonia --n 300 --speed --threads 2

Writes ``docs/results/autoencoder.json`` and ``.md`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, write_result
from models.diffusion.autoencoder import (
    AUTOENCODER_JSON,
    AutoencoderConfig,
    bicubic_round_trip,
    build_vae,
    holdout_split,
    load_vae,
    reconstruct,
    reconstruction_metrics,
    vae_from_checkpoint,
)
from models.diffusion.training import load_training_data
from models.metrics.fid import domain_fid
from models.metrics.spectrum import high_frequency_share


def _load(spec: str, kind: str) -> tuple[str, Any, AutoencoderConfig, dict[str, Any]]:
    name, _, path = spec.partition("=")
    if not path:
        raise SystemExit(f"--{kind} takes NAME=DIR, got {spec!r}")
    if kind == "checkpoint":
        vae, config, state = vae_from_checkpoint(path)
        return name, vae, config, {"steps": int(state["step"]), "wall_seconds": float(state["wall_seconds"])}
    record = json.loads((Path(path) / AUTOENCODER_JSON).read_text())
    return name, load_vae(path), AutoencoderConfig.from_dict(record["config"]), {
        "steps": record.get("steps"), "wall_seconds": record.get("wall_seconds")}


def _row(name: str, original: np.ndarray, rebuilt: np.ndarray, real_hf: float, fid: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name, **reconstruction_metrics(original, rebuilt)}
    hf = high_frequency_share(rebuilt)
    row["hf_share"] = hf
    row["hf_share_vs_real"] = hf / real_hf if real_hf else None
    row["fid_vs_originals"] = domain_fid(rebuilt, original) if fid else None
    return row


def _time(fn: Any, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.inference_mode()
def speed_table(config: AutoencoderConfig, batch: int = 8, rounds: int = 3) -> list[dict[str, Any]]:
    """Encode / decode images per second at full size, mid attention off vs on, interleaved rounds."""
    res, lat = config.resolution, config.latent_size
    x = torch.rand(batch, 1, res, res) * 2 - 1
    z = torch.randn(batch, config.latent_channels, lat, lat)
    nets = {attn: build_vae(config.replace(mid_block_attention=attn)).eval() for attn in (False, True)}
    for net in nets.values():  # warm-up (oneDNN picks kernels on the first call)
        net.decode(z)
        net.encode(x)
    enc: dict[bool, list[float]] = {False: [], True: []}
    dec: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for attn, net in nets.items():
            enc[attn].append(_time(lambda net=net: net.encode(x), 1))
            dec[attn].append(_time(lambda net=net: net.decode(z), 1))
    base = statistics.median(dec[False])
    return [{"mid_attention": attn, "encode_img_s": batch / statistics.median(enc[attn]),
             "decode_img_s": batch / statistics.median(dec[attn]),
             "decode_time_vs_no_attention": statistics.median(dec[attn]) / base,
             "params_m": sum(p.numel() for p in nets[attn].parameters()) / 1e6} for attn in (False, True)]


def render(doc: dict[str, Any]) -> str:
    """Markdown tables of a result JSON."""
    lines = [f"# Autoencoder: held-out reconstruction at {doc['resolution']} px", "",
             f"`{doc['command']}` (commit `{doc['commit'][:10]}`, {doc['machine'].get('cpu')}, "
             f"{doc['machine'].get('cpu_count')} cores, {doc['threads']} torch threads).", "",
             f"{doc['n_images']} held-out images of {doc['n_patients']} patients the autoencoders never saw "
             f"(patient split fraction {doc['holdout_fraction']}, seed {doc['holdout_seed']}). Real images' power "
             f"share above 40 cycles/image: {doc['real_hf_share']:.5f}.", "",
             "| row | steps | PSNR dB | SSIM | HF power vs real | FID vs originals |",
             "|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        fid = "" if r["fid_vs_originals"] is None else f"{r['fid_vs_originals']:.2f}"
        steps = "" if r.get("steps") is None else f"{r['steps']:,}"
        lines.append(f"| {r['name']} | {steps} | {r['psnr_db']:.2f} | {r['ssim']:.4f} | "
                     f"{r['hf_share_vs_real']:.2f} | {fid} |")
    if doc.get("speed"):
        lines += ["", f"Speed at {doc['resolution']} px, batch 8, random weights of the first autoencoder's shape "
                  f"(median of interleaved rounds):", "",
                  "| mid-block attention | encode img/s | decode img/s | decode time vs none | params (M) |",
                  "|---|---|---|---|---|"]
        for s in doc["speed"]:
            lines.append(f"| {'on' if s['mid_attention'] else 'off'} | {s['encode_img_s']:.1f} | "
                         f"{s['decode_img_s']:.1f} | {s['decode_time_vs_no_attention']:.2f}x | {s['params_m']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Command line (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vae", action="append", default=[], help="NAME=DIR of an exported autoencoder")
    ap.add_argument("--checkpoint", action="append", default=[], help="NAME=DIR of a training checkpoint")
    ap.add_argument("--data", required=True, help="the autoencoders' training folder (held-out patients come from it)")
    ap.add_argument("--n", type=int, default=300, help="held-out images to score")
    ap.add_argument("--no-fid", action="store_true")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS_DIR / "autoencoder.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = [_load(s, "vae") for s in args.vae] + [_load(s, "checkpoint") for s in args.checkpoint]
    if not models:
        raise SystemExit("give at least one --vae or --checkpoint")
    config = models[0][2]
    td = load_training_data(args.data, config.resolution)
    _, held = holdout_split(len(td.images), td.patient_ids, config.holdout_fraction, config.seed)
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(held, size=min(args.n, len(held)), replace=False))
    originals = td.images[pick]
    real_hf = high_frequency_share(originals)
    rows = []
    for name, vae, _, info in models:
        rows.append({**_row(name, originals, reconstruct(vae, originals), real_hf, not args.no_fid), **info})
    latent = config.latent_size
    for low in (64, latent) if latent != 64 else (64,):
        rows.append(_row(f"bicubic via {low} px", originals, bicubic_round_trip(originals, low), real_hf,
                         not args.no_fid))
    payload: dict[str, Any] = {
        "resolution": config.resolution, "n_images": len(pick),
        "n_patients": len({td.patient_ids[i] for i in pick}) if td.patient_ids else None,
        "holdout_fraction": config.holdout_fraction, "holdout_seed": config.seed, "threads": args.threads,
        "real_hf_share": real_hf, "rows": rows,
        "speed": speed_table(config) if args.speed else None,
    }
    path = write_result("autoencoder", payload, args.out)
    doc = json.loads(path.read_text())
    path.with_suffix(".md").write_text(render(doc))
    print(render(doc))


if __name__ == "__main__":
    main()
