"""Typed Python client of the cxrsynth REST API (httpx). Users import it; the CLI uses it.

    from app.client import CxrsynthClient
    with CxrsynthClient("http://127.0.0.1:8000", api_key="cxr_...") as c:
        job = c.create_generation(n=16, label="pneumonia", seed=7)
        job = c.wait(job.id)
        c.download_dataset(job.result["dataset_id"], "synthetic.zip")
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from app.schemas.common import DownloadLink
from app.schemas.datasets import DatasetOut
from app.schemas.jobs import JobOut
from app.schemas.models import EncoderOut, GeneratorOut

TERMINAL = {"succeeded", "failed", "canceled"}


class ApiError(Exception):
    """A non-2xx answer; ``problem`` is the RFC 9457 body (``title``, ``detail``, ``status``...)."""

    def __init__(self, status: int, problem: dict[str, Any]) -> None:
        self.status = status
        self.problem = problem
        super().__init__(f"{status} {problem.get('title', '')}: {problem.get('detail', '')}".strip())


def _raise_for_problem(resp: httpx.Response) -> None:
    """:class:`ApiError` with the problem body for a 4xx/5xx answer."""
    if resp.status_code >= 400:
        try:
            problem = resp.json()
        except ValueError:
            problem = {"title": resp.reason_phrase, "detail": resp.text[:500]}
        raise ApiError(resp.status_code, problem)


class CxrsynthClient:
    """Synchronous client. ``transport`` lets tests pass an ASGI transport to skip the network."""

    def __init__(self, base_url: str, api_key: str, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, transport=transport,
                                  headers={"Authorization": f"Bearer {api_key}"})

    def __enter__(self) -> CxrsynthClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # --- plumbing ------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kw: Any) -> Any:
        resp = self._http.request(method, path, **kw)
        _raise_for_problem(resp)
        return resp.json() if resp.content else None

    def _pages(self, path: str, params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        cursor: str | None = None
        while True:
            q = {k: v for k, v in {**params, "cursor": cursor}.items() if v is not None}
            page = self._request("GET", path, params=q)
            yield from page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    # --- jobs ----------------------------------------------------------------------------------
    def create_generation(self, *, n: int | None = None, counts: dict[str, int] | None = None,
                          label: str | None = None, sampler: str | None = None,
                          num_inference_steps: int | None = None, guidance_scale: float | None = None,
                          seed: int | None = None, generator_id: str | None = None, name: str | None = None,
                          webhook_url: str | None = None, idempotency_key: str | None = None) -> JobOut:
        """Request synthetic X-rays (202); the same ``idempotency_key`` and body returns the same job."""
        body = {k: v for k, v in dict(n=n, counts=counts, label=label, sampler=sampler,
                                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                      seed=seed, generator_id=generator_id, name=name,
                                      webhook_url=webhook_url).items() if v is not None}
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        return JobOut.model_validate(self._request("POST", "/v1/generations", json=body, headers=headers))

    def create_generator_training(self, *, dataset_id: str, name: str, resolution: int = 64, steps: int = 3000,
                                  idempotency_key: str | None = None, **extra: Any) -> JobOut:
        """Train a generator on one of your datasets (202)."""
        body = {"dataset_id": dataset_id, "name": name, "resolution": resolution, "steps": steps, **extra}
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        return JobOut.model_validate(self._request("POST", "/v1/generators", json=body, headers=headers))

    def create_pretraining(self, *, dataset_ids: list[str], name: str, idempotency_key: str | None = None,
                           **extra: Any) -> JobOut:
        """Pretrain an encoder on your datasets (202); ``extra``: method, backbone, resolution, epochs or
        steps, batch_size, learning_rate, fp16, seed, webhook_url."""
        body = {"dataset_ids": dataset_ids, "name": name, **{k: v for k, v in extra.items() if v is not None}}
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        return JobOut.model_validate(self._request("POST", "/v1/pretrainings", json=body, headers=headers))

    def create_evaluation(self, *, encoder_id: str, train_dataset_id: str, test_dataset_id: str,
                          idempotency_key: str | None = None, **extra: Any) -> JobOut:
        """Evaluate an encoder (or ``scratch``) on a train/test pair of your datasets (202); ``extra``: task,
        mode, label_fraction, epochs, resolution, seed, webhook_url."""
        body = {"encoder_id": encoder_id, "train_dataset_id": train_dataset_id, "test_dataset_id": test_dataset_id,
                **{k: v for k, v in extra.items() if v is not None}}
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        return JobOut.model_validate(self._request("POST", "/v1/evaluations", json=body, headers=headers))

    def get_job(self, job_id: str) -> JobOut:
        return JobOut.model_validate(self._request("GET", f"/v1/jobs/{job_id}"))

    def list_jobs(self, kind: str | None = None, status: str | None = None, limit: int = 50) -> Iterator[JobOut]:
        """All jobs, newest first (follows the cursor)."""
        for item in self._pages("/v1/jobs", {"kind": kind, "status": status, "limit": limit}):
            yield JobOut.model_validate(item)

    def cancel_job(self, job_id: str) -> JobOut:
        return JobOut.model_validate(self._request("POST", f"/v1/jobs/{job_id}/cancel"))

    def wait(self, job_id: str, poll_s: float = 1.0, timeout_s: float | None = None,
             on_progress: Callable[[JobOut], None] | None = None) -> JobOut:
        """Poll until the job is terminal; ``on_progress`` sees every poll."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.get_job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job.status.value in TERMINAL:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.status.value} after {timeout_s} s")
            time.sleep(poll_s)

    # --- datasets ------------------------------------------------------------------------------
    def list_datasets(self, limit: int = 50) -> Iterator[DatasetOut]:
        for item in self._pages("/v1/datasets", {"limit": limit}):
            yield DatasetOut.model_validate(item)

    def get_dataset(self, dataset_id: str) -> DatasetOut:
        return DatasetOut.model_validate(self._request("GET", f"/v1/datasets/{dataset_id}"))

    def upload_dataset(self, zip_path: str | Path, name: str, wait: bool = True, poll_s: float = 1.0,
                       timeout_s: float = 3600.0) -> DatasetOut:
        """Upload a zip of an ImageFolder (``LABEL/*.png``). The API answers with the dataset ``pending``
        while a worker builds its export; with ``wait`` this polls until it is no longer pending."""
        path = Path(zip_path)
        with path.open("rb") as f:
            data = self._request("POST", "/v1/datasets", data={"name": name},
                                 files={"file": (path.name, f, "application/zip")})
        ds = DatasetOut.model_validate(data)
        deadline = time.monotonic() + timeout_s
        while wait and ds.status == "pending":
            if time.monotonic() > deadline:
                raise TimeoutError(f"dataset {ds.id} was still pending after {timeout_s} s")
            time.sleep(poll_s)
            ds = self.get_dataset(ds.id)
        return ds

    def dataset_download_link(self, dataset_id: str, format: str = "zip", timeout_s: float = 3600.0) -> DownloadLink:
        """The signed link of an export (``zip`` | ``webdataset`` | ``dicom``); while a worker builds it the
        API answers 202 with ``Retry-After``, and this waits (up to ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while True:
            resp = self._http.get(f"/v1/datasets/{dataset_id}/download", params={"format": format})
            if resp.status_code != 202:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {format} export of dataset {dataset_id} was still building after "
                                   f"{timeout_s} s")
            time.sleep(max(0.5, min(30.0, float(resp.headers.get("Retry-After", "5") or 5))))
        _raise_for_problem(resp)
        return DownloadLink.model_validate(resp.json())

    def download_dataset(self, dataset_id: str, out: str | Path, format: str = "zip") -> Path:
        """Fetch the export through its signed URL, streaming to ``out``."""
        return self._fetch(self.dataset_download_link(dataset_id, format).url, Path(out))

    # --- generators and encoders ---------------------------------------------------------------
    def list_generators(self) -> list[GeneratorOut]:
        return [GeneratorOut.model_validate(i) for i in self._pages("/v1/generators", {})]

    def list_encoders(self) -> list[EncoderOut]:
        return [EncoderOut.model_validate(i) for i in self._pages("/v1/encoders", {})]

    def download_encoder(self, encoder_id: str, out: str | Path) -> Path:
        link = DownloadLink.model_validate(self._request("GET", f"/v1/encoders/{encoder_id}/download"))
        return self._fetch(link.url, Path(out))

    def download_generator(self, generator_id: str, out: str | Path) -> Path:
        link = DownloadLink.model_validate(self._request("GET", f"/v1/generators/{generator_id}/download"))
        return self._fetch(link.url, Path(out))

    def _fetch(self, url: str, out: Path) -> Path:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".part")
        # Signed URLs carry their own authority: no API key is sent to the storage host.
        target = url if url.startswith("http") else str(self._http.base_url.join(url))
        with httpx.stream("GET", target, timeout=300, follow_redirects=True) as resp:
            if resp.status_code >= 400:
                resp.read()
                raise ApiError(resp.status_code, {"title": "download failed", "detail": resp.text[:500]})
            with tmp.open("wb") as f:
                for chunk in resp.iter_bytes(1 << 20):
                    f.write(chunk)
        tmp.replace(out)
        return out
