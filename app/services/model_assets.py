"""Generators and encoders: built-in rows, listing (tenant's + built-in), reading, zip downloads.

Built-in models ship as folders on the API's disk: the default generator is
``settings.default_generator_dir`` (diffusers ``config.json`` + ``diffusion_pytorch_model.safetensors`` +
``scheduler_config.json`` + ``cxrsynth.json`` + ``README.md``); built-in encoders are the ``encoder-*``
folders beside it that hold a ``config.json`` and a ``*.safetensors``. Their rows have ``tenant_id`` NULL
and a deterministic id derived from the folder name, so several API processes starting together agree.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.problems import Conflict, NotFound
from app.db.orm import Encoder, Generator
from app.schemas.common import DownloadLink
from app.schemas.models import EncoderOut, GeneratorOut
from app.services.exports import (
    build_folder_zip_from_disk,
    build_folder_zip_from_store,
    folder_fingerprint,
    safe_filename,
    signed_download,
)
from app.services.pagination import as_utc, check_limit, paginate_newest_first
from app.storage.base import ObjectStore, tenant_key

log = logging.getLogger("cxrsynth.models")

GENERATOR_MANIFEST = "cxrsynth.json"
ENCODER_CONFIG = "config.json"
MODEL_CARD = "README.md"

AssetT = TypeVar("AssetT", Generator, Encoder)


def builtin_id(kind: str, name: str) -> str:
    """Deterministic 32-hex id of a built-in model (same in every process)."""
    return hashlib.sha256(f"builtin:{kind}:{name}".encode()).hexdigest()[:32]


def generator_labels(config: dict[str, Any]) -> dict[str, int]:
    """Label name -> class id from a generator's ``cxrsynth.json``.

    Accepts ``labels`` / ``label_to_id`` / ``label_ids`` as a mapping or a list of names,
    ``label_names`` / ``class_names`` as a list, or ``id_to_label`` / ``id2label`` as a mapping.
    Empty for an unconditional generator.
    """
    for key in ("labels", "label_to_id", "label_ids", "label2id", "label_names", "class_names"):
        value = config.get(key)
        if isinstance(value, dict) and value:
            return {str(k): int(v) for k, v in value.items()}
        if isinstance(value, list) and value:
            return {str(name): i for i, name in enumerate(value)}
    for key in ("id_to_label", "id2label"):
        value = config.get(key)
        if isinstance(value, dict) and value:
            return {str(v): int(k) for k, v in value.items()}
    return {}


def generator_resolution(config: dict[str, Any]) -> int | None:
    """The generator's image size in pixels, if its config says."""
    for key in ("resolution", "image_size", "sample_size"):
        value = config.get(key)
        if isinstance(value, int):
            return value
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_card(folder: Path) -> str:
    try:
        return (folder / MODEL_CARD).read_text()
    except OSError:
        return ""


def _upsert_builtin(session: Session, model: type[AssetT], kind: str, folder: Path, config: dict[str, Any]) -> AssetT:
    row_id = builtin_id(kind, folder.name)
    row = session.get(model, row_id)
    metrics = config.get("metrics") if isinstance(config.get("metrics"), dict) else {}
    values = {"name": folder.name, "status": "ready", "builtin_path": str(folder.resolve()), "config": config,
              "metrics": metrics or {}, "card": _read_card(folder)}
    if row is None:
        row = model(id=row_id, tenant_id=None, **values)
        session.add(row)
        try:
            session.flush()
        except IntegrityError:  # another process inserted it first
            session.rollback()
            row = session.get(model, row_id)
            assert row is not None
    for k, v in values.items():
        setattr(row, k, v)
    return row


def _mark_missing_builtins(session: Session, model: type[AssetT], keep: set[str]) -> None:
    for row in session.scalars(select(model).where(model.tenant_id.is_(None))):
        if row.id not in keep and not (row.builtin_path and Path(row.builtin_path).is_dir()):
            row.status = "unavailable"


def builtin_generator_dirs(settings: Settings) -> list[Path]:
    """``default_generator_dir`` and the ``generator-*`` folders beside it that hold a ``cxrsynth.json``
    (the shipped 224 px default and the 64 px generator are both served; a request names one by id)."""
    folder = Path(settings.default_generator_dir)
    dirs = [folder] if (folder / GENERATOR_MANIFEST).is_file() else []
    if not dirs:
        log.warning("no built-in generator: %s has no %s", folder, GENERATOR_MANIFEST)
    if folder.parent.is_dir():
        dirs += sorted(d for d in folder.parent.glob("generator-*")
                       if d.is_dir() and d.name != folder.name and (d / GENERATOR_MANIFEST).is_file())
    return dirs


def ensure_builtin_generators(session: Session, settings: Settings) -> list[Generator]:
    """Upsert a built-in generator row per :func:`builtin_generator_dirs` folder (``config`` = its
    ``cxrsynth.json``); built-in rows whose folder is gone become ``unavailable``. Commits."""
    rows = [_upsert_builtin(session, Generator, "generator", d, _read_json(d / GENERATOR_MANIFEST))
            for d in builtin_generator_dirs(settings)]
    _mark_missing_builtins(session, Generator, {r.id for r in rows})
    session.commit()
    return rows


def builtin_encoder_dirs(settings: Settings) -> list[Path]:
    """``encoder-*`` folders beside the default generator with a ``config.json`` and safetensors."""
    parent = Path(settings.default_generator_dir).parent
    if not parent.is_dir():
        return []
    return sorted(d for d in parent.glob("encoder-*")
                  if d.is_dir() and (d / ENCODER_CONFIG).is_file() and any(d.glob("*.safetensors")))


def ensure_builtin_encoders(session: Session, settings: Settings) -> list[Encoder]:
    """Upsert a built-in encoder row per :func:`builtin_encoder_dirs` folder. Commits."""
    rows = [_upsert_builtin(session, Encoder, "encoder", d, _read_json(d / ENCODER_CONFIG))
            for d in builtin_encoder_dirs(settings)]
    _mark_missing_builtins(session, Encoder, {r.id for r in rows})
    session.commit()
    return rows


def ensure_builtin_models(session: Session, settings: Settings) -> None:
    """Built-in generators and encoders (run at API start)."""
    ensure_builtin_generators(session, settings)
    ensure_builtin_encoders(session, settings)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------
def _visible(model: type[AssetT], tenant_id: str) -> Any:
    return or_(model.tenant_id == tenant_id, model.tenant_id.is_(None))


def get_asset(session: Session, model: type[AssetT], tenant_id: str, asset_id: str) -> AssetT:
    """A tenant's or built-in model by id; :class:`NotFound` otherwise (other tenants' included)."""
    row = session.scalar(select(model).where(model.id == asset_id, _visible(model, tenant_id)))
    if row is None:
        raise NotFound(f"no {model.__tablename__[:-1]} {asset_id}")
    return row


def list_assets(
    session: Session, settings: Settings, model: type[AssetT], tenant_id: str, cursor: str | None, limit: int | None
) -> tuple[list[AssetT], str | None]:
    """One page of the tenant's and the built-in models, newest first."""
    limit = check_limit(limit, settings.page_size_max)
    return paginate_newest_first(session, select(model).where(_visible(model, tenant_id)), model, cursor, limit)


def get_generator(session: Session, tenant_id: str, generator_id: str) -> Generator:
    """A generator the tenant may use (its own or built-in)."""
    return get_asset(session, Generator, tenant_id, generator_id)


def default_generator(session: Session, settings: Settings) -> Generator | None:
    """The ready built-in generator of ``default_generator_dir``, if any."""
    folder = Path(settings.default_generator_dir)
    return session.scalar(select(Generator).where(Generator.id == builtin_id("generator", folder.name),
                                                  Generator.tenant_id.is_(None), Generator.status == "ready"))


def generator_out(g: Generator) -> GeneratorOut:
    """The public shape of a generator."""
    return GeneratorOut(id=g.id, name=g.name, status=g.status, builtin=g.tenant_id is None, config=g.config or {},
                        metrics=g.metrics or {}, card=g.card or "", source_job_id=g.source_job_id,
                        created_at=as_utc(g.created_at), labels=generator_labels(g.config or {}),
                        resolution=generator_resolution(g.config or {}),
                        kind=str((g.config or {}).get("kind") or "pixel"))


def encoder_out(e: Encoder) -> EncoderOut:
    """The public shape of an encoder."""
    return EncoderOut(id=e.id, name=e.name, status=e.status, builtin=e.tenant_id is None, config=e.config or {},
                      metrics=e.metrics or {}, card=e.card or "", source_job_id=e.source_job_id,
                      created_at=as_utc(e.created_at))


def asset_download(
    session: Session, store: ObjectStore, settings: Settings, model: type[AssetT], tenant_id: str, asset_id: str
) -> DownloadLink:
    """A signed URL of a zip of the model folder, built on first request and kept.

    Tenant models: objects under ``prefix`` zipped into ``tenant_key(t, kind, id, "exports", id.zip)``.
    Built-in models: the local folder zipped into ``builtin/{kind}/{id}/exports/{fingerprint}.zip``
    (the fingerprint changes when the shipped files do).
    """
    row = get_asset(session, model, tenant_id, asset_id)
    kind = model.__tablename__  # "generators" | "encoders"
    if row.status != "ready":
        raise Conflict(f"{kind[:-1]} {row.id} is {row.status}, not ready", slug="not-ready")
    filename = safe_filename(row.name, default=row.id) + ".zip"
    if row.tenant_id is None:
        folder = Path(row.builtin_path or "")
        if not folder.is_dir():
            raise Conflict(f"the files of built-in {kind[:-1]} {row.name} are not installed", slug="not-ready")
        key = f"builtin/{kind}/{row.id}/exports/{folder_fingerprint(folder)}.zip"
        if not store.exists(key):
            build_folder_zip_from_disk(folder, store, key)
    else:
        if not row.prefix:
            raise Conflict(f"{kind[:-1]} {row.id} has no files", slug="not-ready")
        key = tenant_key(row.tenant_id, kind, row.id, "exports", f"{row.id}.zip")  # type: ignore[arg-type]
        if not store.exists(key):
            exports = tenant_key(row.tenant_id, kind, row.id, "exports") + "/"  # type: ignore[arg-type]
            build_folder_zip_from_store(store, row.prefix, key, exclude_prefix=exports)
    return signed_download(store, settings, key, filename, "application/zip")
