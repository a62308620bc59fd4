"""What every ``cxrsynth`` command module shares: the stderr console, the ``--api`` / ``--key`` options,
``fail`` (one readable line, exit 2, no traceback), the progress bar, the local tenant of embedded runs,
and a progress bar over an embedded job (:mod:`app.embedded` runs it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:
    from pydantic import ValidationError

    from app.core.config import Settings
    from app.storage.base import ObjectStore

console = Console(stderr=True)
LOCAL_TENANT = "local"

ApiUrl = Annotated[str | None, typer.Option("--api", envvar="CXRSYNTH_API_URL", help="API base URL (remote mode).")]
ApiKeyOpt = Annotated[str | None, typer.Option("--key", envvar="CXRSYNTH_API_KEY", help="API key (remote mode).")]


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a clear error and exit non-zero (no traceback for user errors)."""
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def progress_bar() -> Progress:
    """The progress bar of every long command (on the stderr console)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeElapsedColumn(),
                    console=console)


def validation_message(exc: ValidationError) -> str:
    """A request's validation errors on one line (``field: message; ...``)."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in exc.errors())


def local_tenant(s: Any) -> Any:
    """The tenant of embedded runs (created on first use)."""
    from sqlalchemy import select

    from app.db.orm import Tenant
    from app.services.tenants import create_tenant

    tenant = s.scalar(select(Tenant).where(Tenant.name == LOCAL_TENANT))
    if tenant is None:
        tenant, _ = create_tenant(s, LOCAL_TENANT)
    return tenant


def run_embedded_job(settings: Settings, job_id: str, description: str, *,
                     final_status: bool = False) -> tuple[Any, ObjectStore]:
    """Run a recorded job with the worker's task code in this process, under a progress bar read from the
    database; returns the finished ``Job`` row (detached) and the store its tasks wrote to.
    ``final_status``: the bar ends on the job's status rather than its last message."""
    from app.db.orm import Job
    from app.db.session import get_sessionmaker
    from app.embedded import run_job_inline

    sessions = get_sessionmaker(settings.database_url)
    with progress_bar() as bar:
        task = bar.add_task(description, total=None)

        def show(last: bool = False) -> None:
            with sessions() as s:
                j = s.get(Job, job_id)
                if j is not None:
                    text = j.status if last and final_status else (j.progress_message or j.status)[:60]
                    bar.update(task, completed=j.progress_step, total=j.progress_total or None, description=text)

        store = run_job_inline(settings, job_id, show)
        show(last=True)
    with sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        s.expunge(job)
    return job, store
