"""Job-completion webhooks: POST the job, signed, retried with exponential backoff.

Signature (Standard Webhooks): headers ``webhook-id``, ``webhook-timestamp``, ``webhook-signature``
= ``v1,`` + base64 HMAC-SHA256 over ``id.timestamp.body`` with the tenant's webhook secret.
"""

from __future__ import annotations

import json
import logging
import time

import httpx
from sqlalchemy import select

from app.core.security import webhook_signature
from app.db.orm import Job, JobStatus, Tenant, WebhookDelivery, utcnow
from worker.runtime import WorkerContext, job_payload, record_event

log = logging.getLogger(__name__)


def deliver_webhook(ctx: WorkerContext, job_id: str, sleep: bool = True) -> None:
    """Deliver the completion webhook of a terminal job once (2xx), retrying with backoff."""
    with ctx.sessions.begin() as s:
        job = s.get(Job, job_id)
        if job is None or not job.webhook_url or not JobStatus(job.status).terminal:
            return
        delivery = s.scalar(select(WebhookDelivery).where(WebhookDelivery.job_id == job_id))
        if delivery is None:
            delivery = WebhookDelivery(job_id=job_id, url=job.webhook_url)
            s.add(delivery)
            s.flush()
        if delivery.status != "pending":
            return
        tenant = s.get(Tenant, job.tenant_id)
        assert tenant is not None
        secret, url, msg_id = tenant.webhook_secret, delivery.url, delivery.id
        body = json.dumps({"type": f"job.{job.status}", "data": job_payload(job)}, separators=(",", ":"),
                          default=str).encode()
        attempts_done = delivery.attempts
    for attempt in range(attempts_done, ctx.settings.webhook_max_attempts):
        ts = int(time.time())
        headers = {"content-type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(ts),
                   "webhook-signature": webhook_signature(secret, msg_id, ts, body)}
        code: int | None = None
        error: str | None = None
        try:
            resp = httpx.post(url, content=body, headers=headers, timeout=ctx.settings.webhook_timeout_s)
            code = resp.status_code
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        ok = code is not None and 200 <= code < 300
        with ctx.sessions.begin() as s:
            d = s.get(WebhookDelivery, msg_id)
            assert d is not None
            d.attempts = attempt + 1
            d.last_status_code = code
            d.last_error = error
            if ok:
                d.status, d.delivered_at = "delivered", utcnow()
                record_event(s, job_id, f"webhook delivered ({code})")
            elif attempt + 1 >= ctx.settings.webhook_max_attempts:
                d.status = "failed"
                record_event(s, job_id, f"webhook failed after {attempt + 1} attempts", level="warning")
        if ok:
            return
        if sleep:
            time.sleep(ctx.settings.webhook_backoff_s * (2**attempt))
