"""``cxrsynth datasets export ID --format zip|webdataset|dicom --out PATH`` (registered in ``app.cli``).

* **embedded** (default): reads the local database and object store directly, like the other embedded
  commands, builds the export with the worker's own code (``app.embedded.build_export_inline``, cached
  in the store like a worker would) and copies it to ``--out``. The privacy gate holds here too:
  a synthetic dataset whose gate did not pass is refused unless ``--override-reason`` is given, which
  records an override exactly as the admin endpoint does (by ``cli:<user>`` unless ``--actor``).
* **remote**: with ``--api URL --key KEY`` (or ``CXRSYNTH_API_URL`` / ``CXRSYNTH_API_KEY``) it asks the
  service for a signed link (waiting while a worker builds the export) and downloads it.

``--out`` is a file path, or an existing folder (the export's own file name is used inside it).
"""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Annotated

import typer

from app.cli_common import ApiKeyOpt, ApiUrl, console, fail, progress_bar
from models.release.writers import ExportFormat  # the choices: the registry, EXPORT_FORMATS (checked equal)


def _target(out: Path, filename: str) -> Path:
    return out / filename if out.is_dir() else out


def datasets_export(
    dataset_id: Annotated[str, typer.Argument(help="Dataset id.")],
    out: Annotated[Path, typer.Option("--out", help="Output file, or an existing folder.")],
    format: Annotated[ExportFormat, typer.Option("--format", help="Export format.")] = "zip",
    override_reason: Annotated[str | None, typer.Option(
        help="Embedded only: release a synthetic dataset whose privacy gate did not pass; recorded.")] = None,
    actor: Annotated[str | None, typer.Option(help="Who overrides (default cli:<user>).")] = None,
    api: ApiUrl = None,
    key: ApiKeyOpt = None,
) -> None:
    """Export a dataset as zip (PNG + manifest.csv + card), WebDataset shards or synthetic-marked DICOM."""
    fmt = format
    if api:
        if override_reason:
            fail("--override-reason works on the local database only; through the API an admin overrides "
                  "with POST /v1/admin/datasets/ID/gate-override")
        _export_remote(api, key, dataset_id, fmt, out)
    else:
        _export_embedded(dataset_id, fmt, out, override_reason, actor)


def _export_remote(api: str, key: str | None, dataset_id: str, fmt: str, out: Path) -> None:
    from app.client import ApiError, CxrsynthClient

    if not key:
        fail("remote mode needs --key KEY (or CXRSYNTH_API_KEY)")
    with CxrsynthClient(api, key) as c:
        try:
            with console.status(f"waiting for the {fmt} export"):
                link = c.dataset_download_link(dataset_id, fmt)
            path = c.download_dataset(dataset_id, _target(out, link.filename), fmt)
        except ApiError as exc:
            fail(str(exc))
    console.print(f"[green]exported[/] {path}")


def _export_embedded(dataset_id: str, fmt: str, out: Path, override_reason: str | None, actor: str | None) -> None:
    from app.core.config import get_settings
    from app.core.problems import ProblemError
    from app.db.session import get_sessionmaker, migrate
    from app.embedded import build_export_inline
    from app.services import releases
    from app.services.exports import export_filename
    from app.storage.base import build_store

    settings = get_settings()
    migrate(settings.database_url)
    store = build_store(settings)
    with get_sessionmaker(settings.database_url)() as s:
        try:
            ds = releases.get_any_dataset(s, dataset_id)
            releases.check_format(ds, fmt)
            if ds.status != "ready":
                fail(f"dataset {ds.id} is {ds.status}, not ready")
            if not releases.release_allowed(ds):
                if override_reason is None:
                    fail(f"dataset {ds.id}: privacy gate {ds.gate_status}, not passed; it is not released. Give "
                          "--override-reason TEXT to release it anyway (the override is recorded).")
                if len(override_reason.strip()) < 10:
                    fail("--override-reason must say why, in at least 10 characters")
                who = actor or f"cli:{getpass.getuser()}"
                ds = releases.override_gate(s, ds.id, who, override_reason)
                console.print(f"[yellow]privacy gate overridden[/] by {who} (recorded)")
            with progress_bar() as bar:
                task = bar.add_task(f"{fmt} export", total=ds.num_images or None)

                def on_step(step: int, total: int, message: str) -> None:
                    bar.update(task, completed=step, total=total or None, description=message[:60])

                key = build_export_inline(s, store, ds, fmt, on_step=on_step)
            target = _target(out, export_filename(ds, fmt))
        except ProblemError as exc:
            fail(exc.detail)
    target.parent.mkdir(parents=True, exist_ok=True)
    store.download_file(key, target)
    console.print(f"[green]exported[/] {target} ({target.stat().st_size:,} bytes, {ds.num_images} images)")
