"""``cxrsynth privacy-check`` and ``cxrsynth privacy-index`` (registered in ``app.cli``).

* ``privacy-check --train-data DIR --images DIR [--generator DIR] --json OUT`` audits any folder of
  images (made here or elsewhere) against a training folder: for every image its nearest training
  image, both similarities, the thresholds and pass / fail, plus the privacy report PNG. Exit code 0
  when the check ran (1 with ``--strict`` when an image is flagged), 2 for a user error.
* ``privacy-index --generator DIR --train-data DIR`` (re)builds a generator's privacy index and
  calibrated thresholds from its training folder (patient ids from the file names).

Both run the library (``models.privacy``) in this process; no service is needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from app.cli_common import console, fail, progress_bar


def _check_folder(path: Path, option: str) -> None:
    if not path.is_dir():
        fail(f"{option} {path}: no such folder")


def privacy_check_cmd(
    train_data: Annotated[Path, typer.Option("--train-data", help="The training images (ImageFolder or flat).")],
    images: Annotated[Path, typer.Option("--images", help="The images to check (any folder of PNG/JPEG).")],
    json_out: Annotated[Path, typer.Option("--json", help="Where the report JSON is written.")],
    generator: Annotated[Path | None, typer.Option(
        "--generator", help="Generator folder: its resolution and, if it has one, its calibrated thresholds.")] = None,
    holdout: Annotated[Path | None, typer.Option(
        "--holdout", help="Real images not used in training: calibrate the thresholds on them.")] = None,
    png: Annotated[Path | None, typer.Option(help="Report PNG (default: JSON path with .png).")] = None,
    resolution: Annotated[int | None, typer.Option(help="Comparison resolution without --generator (64).")] = None,
    quantile: Annotated[float, typer.Option(help="Quantile of the real-vs-train similarities used as "
                                                 "threshold when calibrating here.")] = 0.99,
    strict: Annotated[bool, typer.Option("--strict", help="Exit 1 when any image is flagged.")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
) -> None:
    """Check a folder of images for memorised training images: nearest neighbours, similarities, pass/fail."""
    from models.privacy.audit import audit_folder
    from models.privacy.embedding import EmbeddingMismatch

    _check_folder(train_data, "--train-data")
    _check_folder(images, "--images")
    if generator is not None and not (generator / "cxrsynth.json").is_file():
        fail(f"--generator {generator} is not a generator folder (no cxrsynth.json)")
    if holdout is not None:
        _check_folder(holdout, "--holdout")
    if not 0.0 < quantile <= 1.0:
        fail(f"--quantile must be in (0, 1], got {quantile}")
    png_path = png or json_out.with_suffix(".png")
    with progress_bar() as bar:
        task = bar.add_task("privacy check", total=None)

        def on_step(step: int, total: int, message: str) -> None:
            bar.update(task, completed=step, total=total or None, description=message[:60])

        try:
            report = audit_folder(train_data, images, generator_dir=generator, holdout=holdout,
                                  resolution=resolution, quantile=quantile, png_path=png_path, device=device,
                                  on_step=on_step)
        except (ValueError, FileNotFoundError, EmbeddingMismatch) as exc:
            fail(str(exc))
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(report, indent=2) + "\n")
    c, t = report["counts"], report["thresholds"]
    table = Table("images", "flagged", "exact copies", "pixel threshold", "embedding threshold", "status")
    table.add_row(str(c["images"]), str(c["flagged"]), str(c["exact_copies"]), f"{t['pixel']:.4f}",
                  f"{t['embedding']:.4f}", report["status"])
    Console().print(table)
    console.print(f"report: {json_out} and {png_path}")
    if strict and c["flagged"]:
        raise typer.Exit(1)


def privacy_index_cmd(
    generator: Annotated[Path, typer.Option("--generator", help="Generator folder to add the index to.")],
    train_data: Annotated[Path, typer.Option("--train-data", help="The folder it was trained on.")],
    holdout: Annotated[Path | None, typer.Option(
        "--holdout", help="Real images not used in training: calibrate on them instead of leave-one-out.")] = None,
    quantile: Annotated[float, typer.Option(help="Quantile of the real-vs-train similarities used as "
                                                 "threshold.")] = 0.99,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda.")] = "auto",
) -> None:
    """(Re)build a generator's privacy index and calibrated thresholds from its training images."""
    from models.privacy.index import build_for_generator

    if not (generator / "cxrsynth.json").is_file():
        fail(f"--generator {generator} is not a generator folder (no cxrsynth.json)")
    _check_folder(train_data, "--train-data")
    if holdout is not None:
        _check_folder(holdout, "--holdout")
    if not 0.0 < quantile <= 1.0:
        fail(f"--quantile must be in (0, 1], got {quantile}")
    with progress_bar() as bar:
        task = bar.add_task("privacy index", total=None)

        def on_step(step: int, total: int, message: str) -> None:
            bar.update(task, completed=step, total=total or None, description=message[:60])

        try:
            cal = build_for_generator(generator, train_data, holdout=holdout, quantile=quantile, device=device,
                                      on_step=on_step)
        except (ValueError, FileNotFoundError) as exc:
            fail(str(exc))
    ref = cal.reference
    console.print(f"[green]privacy index written[/] to {generator}: thresholds pixel {cal.pixel_threshold:.4f}, "
                  f"embedding {cal.embedding_threshold:.4f} (q={cal.quantile} of {ref['num_reference_images']} "
                  f"{ref['source']}; excluded: {ref['excluded_pairs']})")
