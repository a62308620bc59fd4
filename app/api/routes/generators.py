"""``/v1/generators``: list, read and download generators; ``POST`` trains a new one (a job)."""

from __future__ import annotations

from fastapi import APIRouter, Response

from app.api.deps import IdempotencyKeyDep, SessionDep, SettingsDep, StoreDep, TenantDep
from app.api.responses import CREATE_PROBLEMS, job_accepted
from app.api.routes.jobs import CursorQuery, LimitQuery
from app.core.problems import problem_responses
from app.db.orm import Generator
from app.schemas.common import DownloadLink, Page
from app.schemas.jobs import GeneratorTrainingRequest, JobOut
from app.schemas.models import GeneratorOut
from app.services import model_assets as svc
from app.services.generations import create_generator_training

router = APIRouter(prefix="/v1/generators", tags=["generators"])


@router.get("", response_model=Page[GeneratorOut], responses=problem_responses(401, 422))
def list_generators(
    tenant: TenantDep, session: SessionDep, settings: SettingsDep, cursor: CursorQuery = None, limit: LimitQuery = None
) -> Page[GeneratorOut]:
    """The tenant's generators and the built-in ones, newest first."""
    rows, next_cursor = svc.list_assets(session, settings, Generator, tenant.id, cursor, limit)
    return Page[GeneratorOut](items=[svc.generator_out(g) for g in rows], next_cursor=next_cursor)


@router.post("", status_code=202, response_model=JobOut, responses=CREATE_PROBLEMS)
def train_generator(
    body: GeneratorTrainingRequest, response: Response, tenant: TenantDep, session: SessionDep,
    settings: SettingsDep, idempotency_key: IdempotencyKeyDep = None,
) -> JobOut:
    """Queue a ``generator_training`` job on one of the tenant's datasets (202 + the job)."""
    job, created = create_generator_training(session, settings, tenant.id, body, idempotency_key)
    return job_accepted(response, job, created)


@router.get("/{generator_id}", response_model=GeneratorOut, responses=problem_responses(401, 404))
def get_generator(generator_id: str, tenant: TenantDep, session: SessionDep) -> GeneratorOut:
    """A generator: config (labels, resolution), metrics and model card."""
    return svc.generator_out(svc.get_generator(session, tenant.id, generator_id))


@router.get("/{generator_id}/download", response_model=DownloadLink, responses=problem_responses(401, 404, 409))
def download_generator(
    generator_id: str, tenant: TenantDep, session: SessionDep, store: StoreDep, settings: SettingsDep
) -> DownloadLink:
    """A short-lived signed URL of a zip of the generator folder (built on first request)."""
    return svc.asset_download(session, store, settings, Generator, tenant.id, generator_id)
