"""Response helpers shared by the job-creating routes."""

from __future__ import annotations

from fastapi import Response

from app.core.problems import problem_responses
from app.db.orm import Job
from app.schemas.jobs import JobOut
from app.services.jobs import job_out

# Statuses every job-creating route can answer with a problem.
CREATE_PROBLEMS = problem_responses(401, 404, 409, 422, 429, 503)


def job_accepted(response: Response, job: Job, created: bool) -> JobOut:
    """202 + ``Location`` for a new job; 200 + ``Idempotent-Replayed: true`` for a replayed request."""
    response.status_code = 202 if created else 200
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return job_out(job)
