"""``/v1/encoders``: list, read and download pretrained encoders (tenant's and built-in)."""

from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import SessionDep, SettingsDep, StoreDep, TenantDep
from app.api.routes.jobs import CursorQuery, LimitQuery
from app.core.problems import problem_responses
from app.db.orm import Encoder
from app.schemas.common import DownloadLink, Page
from app.schemas.models import EncoderOut
from app.services import model_assets as svc

router = APIRouter(prefix="/v1/encoders", tags=["encoders"])


@router.get("", response_model=Page[EncoderOut], responses=problem_responses(401, 422))
def list_encoders(
    tenant: TenantDep, session: SessionDep, settings: SettingsDep, cursor: CursorQuery = None, limit: LimitQuery = None
) -> Page[EncoderOut]:
    """The tenant's encoders and the built-in ones, newest first."""
    rows, next_cursor = svc.list_assets(session, settings, Encoder, tenant.id, cursor, limit)
    return Page[EncoderOut](items=[svc.encoder_out(e) for e in rows], next_cursor=next_cursor)


@router.get("/{encoder_id}", response_model=EncoderOut, responses=problem_responses(401, 404))
def get_encoder(encoder_id: str, tenant: TenantDep, session: SessionDep) -> EncoderOut:
    """An encoder: config, metrics and model card."""
    return svc.encoder_out(svc.get_asset(session, Encoder, tenant.id, encoder_id))


@router.get("/{encoder_id}/download", response_model=DownloadLink, responses=problem_responses(401, 404, 409))
def download_encoder(
    encoder_id: str, tenant: TenantDep, session: SessionDep, store: StoreDep, settings: SettingsDep
) -> DownloadLink:
    """A short-lived signed URL of a zip of the encoder folder (built on first request)."""
    return svc.asset_download(session, store, settings, Encoder, tenant.id, encoder_id)
