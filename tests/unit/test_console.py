"""The web console without a browser: FastAPI's TestClient on the embedded stack (SQLite, a local object
folder, the filesystem queue; no worker). Login and logout, CSRF rejection, tenant isolation (another
tenant's ids answer the 404 page), the generation form's validation messages, and that every page renders
with the console's security headers. The browser test is ``tests/e2e/test_console_browser.py``."""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from app.console import routes as console_routes
from app.console.session import COOKIE_NAME
from app.core.config import Settings
from app.db.orm import Dataset, Job, JobEvent
from app.db.session import get_sessionmaker
from app.main import create_app
from app.services.tenants import create_tenant, revoke_api_key
from app.storage.base import ObjectStore, build_store

CSRF_RE = re.compile(r'name="csrf_token" value="([^"]+)"')
FORM_ID_RE = re.compile(r'name="form_id" value="([^"]+)"')


def png_bytes(value: int, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (size, size), value).save(buf, "PNG")
    return buf.getvalue()


@dataclass
class Env:
    client: TestClient
    settings: Settings
    store: ObjectStore

    def session(self) -> Any:
        return get_sessionmaker(self.settings.database_url)()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("console")
    gen = root / "weights" / "generator-console-test"
    gen.mkdir(parents=True)
    (gen / "cxrsynth.json").write_text(json.dumps({"resolution": 32, "labels": {"normal": 0, "pneumonia": 1}}))
    (gen / "README.md").write_text("# Test generator\n\n![samples](samples.png)\n\n<script>alert(1)</script>\n")
    (gen / "samples.png").write_bytes(png_bytes(90))
    settings = Settings(_env_file=None, data_dir=root / "data", default_generator_dir=gen,  # type: ignore[call-arg]
                        public_base_url="http://testserver", page_size_max=50)
    store = build_store(settings)
    with TestClient(create_app(settings, store)) as client:
        yield Env(client, settings, store)


@dataclass
class Tenant:
    id: str
    key: str


_counter = iter(range(10_000))


def new_tenant(env: Env) -> Tenant:
    with env.session() as s:
        t, key = create_tenant(s, f"console-tenant-{next(_counter)}")
        return Tenant(t.id, key)


def login(env: Env, tenant: Tenant) -> str:
    """Log the client in as ``tenant``; returns the session's CSRF token."""
    env.client.cookies.clear()
    page = env.client.get("/console/login")
    token = CSRF_RE.search(page.text).group(1)  # type: ignore[union-attr]
    r = env.client.post("/console/login", data={"api_key": tenant.key, "csrf_token": token, "next": "/console/jobs"},
                        follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/console/jobs"
    return CSRF_RE.search(env.client.get("/console/jobs").text).group(1)  # type: ignore[union-attr]


def add_synthetic_dataset(env: Env, tenant: Tenant, n: int = 3, gate: str = "passed",
                          privacy: dict[str, Any] | None = None) -> str:
    """A ready synthetic dataset as the generation worker leaves it: PNGs, manifest with seeds, row."""
    with env.session() as s:
        job = Job(tenant_id=tenant.id, kind="generation", status="succeeded", params={"n": n})
        s.add(job)
        s.flush()
        ds = Dataset(tenant_id=tenant.id, name="synthetic-test", origin="synthetic", status="ready", prefix="",
                     num_images=n, label_counts={"normal": n - 1, "pneumonia": 1}, gate_status=gate,
                     privacy=privacy, source_job_id=job.id)
        s.add(ds)
        s.flush()
        ds.prefix = f"tenants/{tenant.id}/datasets/{ds.id}/images"
        ds.manifest_key = f"tenants/{tenant.id}/datasets/{ds.id}/manifest.csv"
        rows = ["file,label,sha256,index,seed,sampler,steps,guidance,generator_id,nn_pixel_similarity"]
        for i in range(n):
            label = "pneumonia" if i == n - 1 else "normal"
            env.store.put_bytes(f"{ds.prefix}/{label}/{i:07d}.png", png_bytes(20 * i), "image/png")
            rows.append(f"{label}/{i:07d}.png,{label},{'0' * 64},{i},{1000 + i},ddim,5,2.0,g,0.{40 + i}")
        env.store.put_bytes(ds.manifest_key, ("\n".join(rows) + "\n").encode(), "text/csv")
        job.result = {"dataset_id": ds.id, "num_images": n}
        s.commit()
        return ds.id


def upload_real_dataset(env: Env, tenant: Tenant) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("normal/a.png", png_bytes(10))
        zf.writestr("pneumonia/b.png", png_bytes(200))
    r = env.client.post("/v1/datasets", files={"file": ("set.zip", buf.getvalue(), "application/zip")},
                        headers={"Authorization": f"Bearer {tenant.key}"})
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "pending"  # the worker builds it; here, what the worker does, in process
    from worker.exports import run_dataset_build

    run_dataset_build(get_sessionmaker(env.settings.database_url), env.store, r.json()["id"])
    return str(r.json()["id"])


def job_count(env: Env, tenant: Tenant) -> int:
    with env.session() as s:
        return int(s.scalar(select(func.count()).select_from(Job).where(Job.tenant_id == tenant.id)) or 0)


def assert_html(r: Any, status: int = 200) -> str:
    assert r.status_code == status, r.text[:2000]
    assert r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert r.headers["referrer-policy"] == "no-referrer"
    assert "<script>" not in r.text  # only the app's own script file, no inline code
    return str(r.text)


# --------------------------------------------------------------------------------------------------
def test_login_cookie_and_logout(env: Env) -> None:
    tenant = new_tenant(env)
    env.client.cookies.clear()
    r = env.client.get("/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/console/jobs"
    r = env.client.get("/console/datasets", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/console/login?next=%2Fconsole%2Fdatasets"
    page = env.client.get("/console/login")
    assert_html(page)
    cookie = page.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert "Secure" not in cookie and "Path=/console" in cookie  # http here: Secure comes with https
    secure = TestClient(env.client.app, base_url="https://testserver").get("/console/login")
    assert "Secure" in secure.headers["set-cookie"]
    token = CSRF_RE.search(page.text).group(1)  # type: ignore[union-attr]

    bad = env.client.post("/console/login", data={"api_key": "cxr_wrong", "csrf_token": token})
    assert "invalid or revoked" in assert_html(bad, 401)
    r = env.client.post("/console/login", data={"api_key": tenant.key, "csrf_token": token,
                                                "next": "https://evil.example/"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/console/jobs"  # no open redirect
    jobs = assert_html(env.client.get("/console/jobs"))
    new_token = CSRF_RE.search(jobs).group(1)  # type: ignore[union-attr]
    assert new_token != token  # rotated at login

    r = env.client.post("/console/logout", data={"csrf_token": new_token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/console/login"
    assert env.client.get("/console/jobs", follow_redirects=False).status_code == 303


def test_tampered_cookie_and_revoked_key_end_the_session(env: Env) -> None:
    tenant = new_tenant(env)
    login(env, tenant)
    value = env.client.cookies.get(COOKIE_NAME)
    assert value
    body, sig = value.rsplit(".", 1)
    env.client.cookies.clear()
    env.client.cookies.set(COOKIE_NAME, f"{body}.{sig[::-1]}")  # same key, broken signature
    assert env.client.get("/console/jobs", follow_redirects=False).status_code == 303
    login(env, tenant)
    with env.session() as s:
        revoke_api_key(s, tenant.key)
    r = env.client.get("/console/jobs", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/console/login")


def test_csrf_is_required_on_every_form(env: Env) -> None:
    tenant = new_tenant(env)
    token = login(env, tenant)
    body = {"n": "2", "sampler": "ddim", "guidance_scale": "2", "form_id": "console-csrf-test"}
    assert "reload the page" in assert_html(env.client.post("/console/jobs", data=body), 403)
    assert_html(env.client.post("/console/jobs", data={**body, "csrf_token": "forged"}), 403)
    cross_site = env.client.post("/console/jobs", data={**body, "csrf_token": token},
                                 headers={"Sec-Fetch-Site": "cross-site"})
    assert_html(cross_site, 403)
    foreign_origin = env.client.post("/console/jobs", data={**body, "csrf_token": token},
                                     headers={"Origin": "https://evil.example"})
    assert_html(foreign_origin, 403)
    assert job_count(env, tenant) == 0
    # Logout needs the token too; and a login POST without the login page's cookie is refused.
    assert_html(env.client.post("/console/logout", data={}), 403)
    env.client.cookies.clear()
    assert_html(env.client.post("/console/login", data={"api_key": tenant.key, "csrf_token": token}), 403)


def test_generation_form_validation_messages_and_idempotency(env: Env) -> None:
    tenant = new_tenant(env)
    token = login(env, tenant)
    page = env.client.get("/console/jobs").text
    form_id = FORM_ID_RE.search(page).group(1)  # type: ignore[union-attr]
    base = {"csrf_token": token, "form_id": form_id, "sampler": "ddim", "guidance_scale": "2"}

    html = assert_html(env.client.post("/console/jobs", data={**base, "n": "0"}), 422)
    assert re.search(r'id="e-n">Input should be greater than or equal to 1<', html)
    assert 'id="f-n" name="n" type="number" value="0"' in html  # the form keeps what was typed
    html = assert_html(env.client.post("/console/jobs", data={**base, "n": "4", "counts_normal": "2"}), 422)
    assert "give either counts, or n" in html
    html = assert_html(env.client.post("/console/jobs", data={**base, "n": "3", "guidance_scale": "99"}), 422)
    assert re.search(r'id="e-guidance_scale">Input should be less than or equal to 20', html)
    html = assert_html(env.client.post("/console/jobs", data={**base, "n": "3", "generator_id": "f" * 32}), 404)
    assert "no generator" in html
    assert job_count(env, tenant) == 0

    r = env.client.post("/console/jobs", data={**base, "counts_normal": "2", "counts_pneumonia": "1", "seed": "7",
                                               "num_inference_steps": "5"}, follow_redirects=False)
    assert r.status_code == 303, r.text[:1000]
    job_id = re.fullmatch(r"/console/jobs/([0-9a-f]{32})\?created=1", r.headers["location"]).group(1)  # type: ignore[union-attr]
    with env.session() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.tenant_id == tenant.id
        assert job.params["counts"] == {"normal": 2, "pneumonia": 1} and job.params["seed"] == 7
        assert job.params["sampler"] == "ddim" and job.params["num_inference_steps"] == 5
    # A double submit of the same form makes no second job.
    again = env.client.post("/console/jobs", data={**base, "counts_normal": "2", "counts_pneumonia": "1",
                                                   "seed": "7", "num_inference_steps": "5"}, follow_redirects=False)
    assert again.headers["location"] == r.headers["location"]
    assert job_count(env, tenant) == 1

    html = assert_html(env.client.get(r.headers["location"]))
    assert "Generation queued" in html and f'data-job-id="{job_id}"' in html
    status = env.client.get("/console/jobs/status", params={"id": [job_id, "0" * 32]}).json()
    assert [j["id"] for j in status["jobs"]] == [job_id] and status["jobs"][0]["status"] == "queued"

    # Cancel through the console: a queued job is canceled at once; canceling again is the API's 409.
    r = env.client.post(f"/console/jobs/{job_id}/cancel", data={"csrf_token": token, "next": "/console/jobs"},
                        follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/console/jobs"
    with env.session() as s:
        assert s.get(Job, job_id).status == "canceled"  # type: ignore[union-attr]
    html = assert_html(env.client.post(f"/console/jobs/{job_id}/cancel", data={"csrf_token": token}), 409)
    assert "already canceled" in html and f"/console/jobs/{job_id}" in html


def test_gallery_image_page_downloads_and_reports(env: Env) -> None:
    tenant = new_tenant(env)
    login(env, tenant)
    ds_id = add_synthetic_dataset(env, tenant, n=3, privacy={"rejected": 1, "memorisation_rate_after": 0.0})
    html = assert_html(env.client.get(f"/console/datasets/{ds_id}"))
    alts = re.findall(r'<img src="([^"]+)" alt="([^"]+)"', html)
    assert [a for _, a in alts] == ["Synthetic chest X-ray #0, label normal, seed 1000",
                                    "Synthetic chest X-ray #1, label normal, seed 1001",
                                    "Synthetic chest X-ray #2, label pneumonia, seed 1002"]
    thumb = env.client.get(alts[0][0].replace("http://testserver", ""))
    assert thumb.status_code == 200 and thumb.content == png_bytes(0)
    assert [f for f in ("zip", "webdataset", "dicom") if f'data-format="{f}"' in html] == ["zip", "webdataset",
                                                                                              "dicom"]
    assert "memorisation rate after" in html
    filtered = env.client.get(f"/console/datasets/{ds_id}", params={"label": "pneumonia"}).text
    assert re.findall(r'alt="([^"]+)"', filtered) == ["Synthetic chest X-ray #2, label pneumonia, seed 1002"]

    assert "page: Input should be greater than or equal to 1" in assert_html(
        env.client.get(f"/console/datasets/{ds_id}", params={"page": 0}), 422)
    img = assert_html(env.client.get(f"/console/datasets/{ds_id}/images/1"))
    assert "nn pixel similarity" in img and "0.41" in img and "1001" in img and 'rel="next"' in img
    assert_html(env.client.get(f"/console/datasets/{ds_id}/images/3"), 404)

    # No export built yet: the page asks again after the service's Retry-After (a worker builds it).
    pending = env.client.get(f"/console/datasets/{ds_id}/download", params={"format": "webdataset"})
    assert "being built" in assert_html(pending, 202) and pending.headers["retry-after"]
    assert '<meta http-equiv="refresh"' in pending.text
    assert "unknown format" in assert_html(env.client.get(f"/console/datasets/{ds_id}/download",
                                                          params={"format": "tiff"}), 422)

    report = assert_html(env.client.get(f"/console/datasets/{ds_id}/report"))
    assert "Privacy gate passed" in report and "rejected" in report
    reports = assert_html(env.client.get("/console/reports"))
    assert "synthetic-test" in reports and "No evaluation has finished yet" in reports


def test_gate_not_passed_hides_images_and_blocks_downloads(env: Env) -> None:
    tenant = new_tenant(env)
    login(env, tenant)
    ds_id = add_synthetic_dataset(env, tenant, n=2, gate="not_run")
    html = assert_html(env.client.get(f"/console/datasets/{ds_id}"))
    assert "Privacy gate not run" in html and 'id="gallery-blocked"' in html and "<img" not in html
    blocked = assert_html(env.client.get(f"/console/datasets/{ds_id}/download", params={"format": "zip"}), 409)
    assert "privacy gate" in blocked and f'href="/console/datasets/{ds_id}"' in blocked
    assert "privacy gate not run" in assert_html(env.client.get(f"/console/datasets/{ds_id}/report")).lower()


def test_real_dataset_download_redirects_to_the_signed_file(env: Env) -> None:
    tenant = new_tenant(env)
    login(env, tenant)
    ds_id = upload_real_dataset(env, tenant)
    html = assert_html(env.client.get(f"/console/datasets/{ds_id}"))
    assert 'data-format="zip"' in html and 'data-format="dicom"' not in html  # no DICOM of real images
    assert "Real chest X-ray a.png, label normal" in html
    r = env.client.get(f"/console/datasets/{ds_id}/download", params={"format": "zip"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("http://testserver/v1/files/")
    data = env.client.get(r.headers["location"].replace("http://testserver", ""))
    assert data.status_code == 200
    with zipfile.ZipFile(io.BytesIO(data.content)) as zf:
        assert sorted(n for n in zf.namelist() if n.endswith(".png")) == ["normal/a.png", "pneumonia/b.png"]


def test_other_tenants_ids_answer_the_not_found_page(env: Env) -> None:
    owner, other = new_tenant(env), new_tenant(env)
    login(env, owner)
    ds_id = add_synthetic_dataset(env, owner, n=2)
    with env.session() as s:
        job_id = s.scalar(select(Job.id).where(Job.tenant_id == owner.id))
    token = login(env, other)
    for path in (f"/console/datasets/{ds_id}", f"/console/datasets/{ds_id}/images/0",
                 f"/console/datasets/{ds_id}/download?format=zip", f"/console/datasets/{ds_id}/report",
                 f"/console/jobs/{job_id}", "/console/datasets/" + "0" * 32, "/console/no-such-page"):
        html = assert_html(env.client.get(path, follow_redirects=False), 404)
        assert "<h1>Not found</h1>" in html, path
    assert_html(env.client.post(f"/console/jobs/{job_id}/cancel", data={"csrf_token": token}), 404)
    assert env.client.get("/console/jobs/status", params={"id": job_id}).json() == {"jobs": []}
    listing = env.client.get("/console/datasets").text
    assert ds_id not in listing and "No datasets yet" in listing


def add_running_job(env: Env, tenant: Tenant, messages: list[str]) -> tuple[str, list[int]]:
    """A running generation job with one event per message; returns its id and the events' ids."""
    with env.session() as s:
        job = Job(tenant_id=tenant.id, kind="generation", status="running", params={"n": 2})
        s.add(job)
        s.flush()
        events = [JobEvent(job_id=job.id, message=m, step=i + 1, total=len(messages)) for i, m in enumerate(messages)]
        s.add_all(events)
        s.commit()
        return job.id, [e.id for e in events]


def test_job_events_endpoint_follows_the_log(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    owner, other = new_tenant(env), new_tenant(env)
    login(env, owner)
    job_id, ids = add_running_job(env, owner, ["loading the generator", "sampling <b>1</b>", "sampling 2"])
    html = assert_html(env.client.get(f"/console/jobs/{job_id}"))
    assert (f'data-events="/console/jobs/{job_id}/events" data-last-event-id="{ids[-1]}" '
            f'data-events-max="{console_routes.EVENTS_SHOWN}"') in html
    assert "Updates while the job runs." in html and "reload for newer lines" not in html.split("<noscript>")[0]

    r = env.client.get(f"/console/jobs/{job_id}/events", params={"after": ids[0]})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["active"] is True
    assert [(e["id"], e["message"], e["step"], e["total"]) for e in body["events"]] == [
        (ids[1], "sampling <b>1</b>", 2, 3), (ids[2], "sampling 2", 3, 3)]
    assert {"created_at", "level"} <= set(body["events"][0])
    all_events = env.client.get(f"/console/jobs/{job_id}/events").json()["events"]
    assert [e["id"] for e in all_events] == ids
    monkeypatch.setattr(console_routes, "EVENTS_SHOWN", 2)  # capped, oldest first: the rest on the next poll
    assert [e["id"] for e in env.client.get(f"/console/jobs/{job_id}/events").json()["events"]] == ids[:2]
    monkeypatch.undo()
    with env.session() as s:
        s.get(Job, job_id).status = "succeeded"  # type: ignore[union-attr]
        s.commit()
    assert env.client.get(f"/console/jobs/{job_id}/events", params={"after": ids[-1]}).json() == {
        "events": [], "active": False}
    assert_html(env.client.get(f"/console/jobs/{job_id}/events", params={"after": -1}), 422)

    empty_id, _ = add_running_job(env, owner, [])
    html = assert_html(env.client.get(f"/console/jobs/{empty_id}"))
    assert 'data-last-event-id="0"' in html and "No events yet." in html

    env.client.cookies.clear()  # no session: the login page, as for /console/jobs/status
    for path in (f"/console/jobs/{job_id}/events", f"/console/jobs/status?id={job_id}"):
        r = env.client.get(path, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/console/login?next="), path
    login(env, other)
    html = assert_html(env.client.get(f"/console/jobs/{job_id}/events", params={"after": 0}), 404)
    assert "<h1>Not found</h1>" in html and "sampling" not in html


def test_model_pages_cards_and_downloads(env: Env) -> None:
    tenant = new_tenant(env)
    login(env, tenant)
    listing = assert_html(env.client.get("/console/generators"))
    gen_id = re.search(r'/console/generators/([0-9a-f]{32})"', listing).group(1)  # type: ignore[union-attr]
    page = assert_html(env.client.get(f"/console/generators/{gen_id}"))
    assert "<h3>Test generator</h3>" in page  # the card's headings sit under the page's
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # raw HTML in a card is shown, never run
    assert f'src="/console/generators/{gen_id}/files/samples.png"' in page
    sample = env.client.get(f"/console/generators/{gen_id}/files/samples.png")
    assert sample.status_code == 200 and sample.headers["content-type"] == "image/png"
    assert_html(env.client.get(f"/console/generators/{gen_id}/files/cxrsynth.json"), 404)  # images only
    assert_html(env.client.get(f"/console/generators/{gen_id}/files/..%2Fsecret.png"), 404)
    r = env.client.get(f"/console/generators/{gen_id}/download", follow_redirects=False)
    assert r.status_code == 303
    zipped = env.client.get(r.headers["location"].replace("http://testserver", "")).content
    with zipfile.ZipFile(io.BytesIO(zipped)) as zf:
        assert "cxrsynth.json" in zf.namelist()
    assert "No encoders yet" in assert_html(env.client.get("/console/encoders"))
    for path in ("/console/static/console.css", "/console/static/console.js", "/console/static/favicon.svg"):
        assert env.client.get(path).status_code == 200, path


def test_evaluation_results_become_tables_and_a_label_efficiency_chart(env: Env) -> None:
    tenant = new_tenant(env)
    login(env, tenant)
    with env.session() as s:
        for fraction, auc in ((0.01, 0.8), (0.1, 0.88), (1.0, 0.93)):
            s.add(Job(tenant_id=tenant.id, kind="evaluation", status="succeeded", params={}, result={
                "task": "classification", "mode": "linear", "label_fraction": fraction,
                "encoder": {"name": "encoder-x"},
                "metrics": {"auc": {"value": auc, "low": auc - 0.03, "high": auc + 0.02}}}))
        s.commit()
    html = assert_html(env.client.get("/console/reports"))
    assert html.count("<polyline") == 1 and html.count("<circle") == 3
    assert "Label efficiency, classification: AUC" in html
    assert "AUC 0.93 [0.9, 0.95]" in html and "1.0 %" in html
