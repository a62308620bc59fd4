"""The web console end to end in headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by
Selenium): the real API process (uvicorn) and a Celery worker on Postgres, Redis and SeaweedFS, a tiny
generator. Log in with a key, submit an invalid then a valid generation, watch it finish, open the
gallery and an image, download, and see another tenant's dataset answer "not found".

Screenshots of every page at 1280 and 390 px wide go to ``CXRSYNTH_ARTIFACTS_DIR`` (default
``<repo>/artifacts/console/``), kept as CI artifacts.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import secrets
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from app.core.config import REPO_ROOT
from tests.support import service_unavailable

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CHROMIUM = os.environ.get("CXRSYNTH_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CXRSYNTH_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
WIDTHS = (1280, 390)
ALT_RE = re.compile(r"^Synthetic chest X-ray #\d+, label (normal|pneumonia), seed \d+$")


def artifacts_dir() -> Path:
    """Where screenshots go: ``CXRSYNTH_ARTIFACTS_DIR`` or ``<repo>/artifacts/console``."""
    path = Path(os.environ.get("CXRSYNTH_ARTIFACTS_DIR") or REPO_ROOT / "artifacts" / "console")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Chromium with a fresh profile and downloads allowed into ``tmp_path/downloads``."""
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        service_unavailable(f"Chromium not found ({CHROMIUM}, {CHROMEDRIVER}): "
                            "apt-get install chromium chromium-driver")
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never try to download a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = Path(tempfile.mkdtemp(prefix="cxr-chromium-"))
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}", "--window-size=1280,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    try:
        yield driver
    finally:
        with contextlib.suppress(Exception):  # the last page, to read when a step fails
            (artifacts_dir() / "last-page.html").write_text(driver.page_source)
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver: Any, name: str) -> None:
    """Full-page PNGs of the current page at each width (device-metrics emulation, so 390 px is real)."""
    out = artifacts_dir()
    for width in WIDTHS:
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": width < 600})
        time.sleep(0.2)
        height = int(driver.execute_script("return document.documentElement.scrollHeight"))
        inner = int(driver.execute_script("return window.innerWidth"))
        assert inner == width, f"viewport is {inner} px, wanted {width}"
        overflow = driver.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 1, f"{name} at {width} px scrolls sideways by {overflow} px"
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": min(height, 6000), "scale": 1}})
        (out / f"{name}-{width}.png").write_bytes(base64.b64decode(shot["data"]))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def _is_dom_race(exc: Exception) -> bool:
    """A node the page's script removed between chromedriver finding it and reading it (live updates)."""
    from selenium.common.exceptions import StaleElementReferenceException

    return isinstance(exc, StaleElementReferenceException) or "does not belong to the document" in str(exc)


def wait_until(pred: Callable[[], Any], timeout: float, what: str, logs: Callable[[], str]) -> Any:
    """Poll pred until truthy. The console's script updates pages in place, so a read that races one of its
    DOM edits is retried; any other error fails at once."""
    from selenium.common.exceptions import WebDriverException

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = pred()
        except WebDriverException as exc:
            if not _is_dom_race(exc):
                raise
            value = None
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}\n{logs()}")


def create_tenant(svc: Any, name: str) -> str:
    res = svc.cli("tenants", "create", name)
    assert res.returncode == 0, res.stderr
    return str(res.stdout.strip().splitlines()[-1])


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (16, 16), value).save(buf, "PNG")
    return buf.getvalue()


def click_and_load(driver: Any, element: Any) -> None:
    """Click something that navigates (a link, a submit button) and wait until the new page has loaded."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    old = driver.find_element(By.TAG_NAME, "html")
    try:
        element.click()
    except WebDriverException as exc:
        # The click navigated before chromedriver finished with the node; the waits below check the load.
        if not _is_dom_race(exc):
            raise
    WebDriverWait(driver, 60).until(expected_conditions.staleness_of(old))
    WebDriverWait(driver, 60).until(lambda d: d.execute_script("return document.readyState") == "complete")


def images_loaded(driver: Any, selector: str) -> bool:
    return bool(driver.execute_script(
        "const imgs = [...document.querySelectorAll(arguments[0])];"
        "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);", selector))


def test_console_in_headless_chromium(settings_factory: Any, services_factory: Any, tiny_generator: Path,
                                      tmp_path: Path, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    admin_token = secrets.token_urlsafe(16)
    settings = settings_factory(tmp_path, stack="real", default_generator_dir=tiny_generator, shard_size=4,
                                admin_token=admin_token)
    svc = services_factory(settings)
    base = svc.api()
    svc.worker("console")
    suffix = secrets.token_hex(3)
    key_a = create_tenant(svc, f"St Elsewhere {suffix}")
    key_b = create_tenant(svc, f"Other Hospital {suffix}")
    # Tenant B owns a small real dataset (the upload answers at once, pending; the worker builds its export).
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("normal/a.png", png(40))
        zf.writestr("pneumonia/b.png", png(200))
    up = httpx.post(f"{base}/v1/datasets", headers={"Authorization": f"Bearer {key_b}"},
                    files={"file": ("b.zip", buf.getvalue(), "application/zip")}, timeout=60)
    assert up.status_code == 201, up.text
    foreign_dataset = up.json()["id"]
    d = browser

    # 1. Log in (an unauthenticated visit lands on the login page).
    d.get(f"{base}/")
    assert "/console/login" in d.current_url
    assert d.switch_to.active_element.get_attribute("id") == "api_key"  # the key field has focus
    screenshot(d, "01-login")
    d.find_element(By.ID, "api_key").send_keys("cxr_not-a-real-key")
    click_and_load(d, d.find_element(By.CSS_SELECTOR, "form.form button[type=submit]"))
    assert "invalid or revoked" in d.find_element(By.ID, "login-error").text
    d.find_element(By.ID, "api_key").send_keys(key_a)
    click_and_load(d, d.find_element(By.CSS_SELECTOR, "form.form button[type=submit]"))
    assert d.current_url.endswith("/console/jobs"), d.current_url
    assert f"St Elsewhere {suffix}" in d.find_element(By.CSS_SELECTOR, ".tenant").text
    cookie = d.get_cookie("cxrsynth_console")
    assert cookie and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    # Keyboard: the first Tab reaches the skip link, which moves focus to the page's content.
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    ActionChains(d).send_keys(Keys.TAB).perform()
    skip = d.switch_to.active_element
    assert skip.get_attribute("class") == "skip-link" and skip.text == "Skip to content"
    skip.send_keys(Keys.ENTER)
    assert d.switch_to.active_element.get_attribute("id") == "content"

    # 2. An invalid generation shows the API's validation message and creates nothing.
    d.find_element(By.ID, "f-n").send_keys("0")
    click_and_load(d, d.find_element(By.CSS_SELECTOR, "form.form button[type=submit]"))
    assert "greater than or equal to 1" in d.find_element(By.ID, "e-n").text
    assert d.find_element(By.ID, "f-n").get_attribute("aria-invalid") == "true"
    assert not d.find_elements(By.CSS_SELECTOR, "tr[data-job-id]")
    screenshot(d, "02-generation-invalid")

    # 3. A valid one: 4 images, DDIM 5 steps, seed 7; the job page follows it to the end.
    field = d.find_element(By.ID, "f-n")
    field.clear()
    field.send_keys("4")
    Select(d.find_element(By.ID, "f-sampler")).select_by_value("ddim")
    d.find_element(By.ID, "f-num_inference_steps").send_keys("5")
    d.find_element(By.ID, "f-seed").send_keys("7")
    click_and_load(d, d.find_element(By.CSS_SELECTOR, "form.form button[type=submit]"))
    assert re.search(r"/console/jobs/[0-9a-f]{32}\?created=1$", d.current_url), d.current_url
    job_id = d.current_url.split("/jobs/")[1].split("?")[0]
    wait_until(lambda: d.find_element(By.CSS_SELECTOR, "[data-status]").text in ("succeeded", "failed", "canceled"),
               180, "the job page to show the job finished", svc.logs_tail)
    assert d.find_element(By.CSS_SELECTOR, "[data-status]").text == "succeeded", svc.logs_tail()
    assert d.find_element(By.CSS_SELECTOR, "[data-progress]").get_attribute("value") == "100"
    # The event log followed the job without a reload: it ends with the API's last line for the job
    # (fetched afresh each try: a line may still be added after the job finished).
    def api_messages() -> list[str]:
        got = httpx.get(f"{base}/v1/jobs/{job_id}/events", params={"format": "json"},
                        headers={"Authorization": f"Bearer {key_a}"})
        return [e["message"] for e in got.json()][-200:]

    def log_rows() -> list[str]:
        # One script call reads every row at once: the page's script removes the "No events yet" row and
        # appends lines while it polls, so element-by-element reads could race it.
        return list(d.execute_script(
            "return [...document.querySelectorAll('tbody[data-events] tr')]"
            ".filter(r => !r.querySelector('td.empty')).map(r => r.innerText);"))

    def log_matches_api() -> bool:
        api, page_rows = api_messages(), log_rows()
        return bool(api) and len(page_rows) == len(api) and all(m in r for m, r in zip(api, page_rows, strict=True))

    wait_until(log_matches_api, 30, "the event log to show every event of the job without a reload", svc.logs_tail)
    screenshot(d, "03-job-succeeded")

    # The jobs list shows it too, with a link to its dataset.
    d.get(f"{base}/console/jobs")
    row = d.find_element(By.CSS_SELECTOR, f'tr[data-job-id="{job_id}"]')
    assert row.find_element(By.CSS_SELECTOR, "[data-status]").text == "succeeded"
    screenshot(d, "04-jobs")

    # 4. The gallery: four thumbnails that load, with alt texts naming label and seed. Image links are
    # downloads too, so a synthetic dataset whose privacy gate did not pass shows the API's reason
    # instead, until an admin overrides the gate (recorded).
    d.get(f"{base}/console/jobs/{job_id}")
    click_and_load(d, d.find_element(By.LINK_TEXT, "Open the dataset"))
    dataset_id = d.current_url.rstrip("/").split("/datasets/")[1].split("?")[0]
    gate = httpx.get(f"{base}/v1/datasets/{dataset_id}", headers={"Authorization": f"Bearer {key_a}"}).json()
    if gate["gate_status"] != "passed":
        assert not d.find_elements(By.CSS_SELECTOR, ".gallery img")
        assert "privacy gate" in d.find_element(By.ID, "gallery-blocked").text
        screenshot(d, "05-gallery-gate-not-passed")
        override = httpx.post(f"{base}/v1/admin/datasets/{dataset_id}/gate-override",
                              headers={"Authorization": f"Bearer {admin_token}"},
                              json={"actor": "console test", "reason": "browser test of the console gallery"})
        assert override.status_code == 200, override.text
        d.refresh()
        assert "overrode the gate" in d.find_element(By.CSS_SELECTOR, "section[aria-labelledby=ds-privacy]").text
    thumbs = d.find_elements(By.CSS_SELECTOR, ".gallery img")
    assert len(thumbs) == 4
    assert all(ALT_RE.match(t.get_attribute("alt") or "") for t in thumbs), [t.get_attribute("alt") for t in thumbs]
    wait_until(lambda: images_loaded(d, ".gallery img"), 30, "thumbnails to load", svc.logs_tail)
    screenshot(d, "05-gallery")
    # Filter by label, then open the first image.
    click_and_load(d, d.find_element(By.CSS_SELECTOR, '.filters a[href$="label=normal"]'))
    labels = {ALT_RE.match(t.get_attribute("alt") or "").group(1)  # type: ignore[union-attr]
              for t in d.find_elements(By.CSS_SELECTOR, ".gallery img")}
    assert labels == {"normal"}
    click_and_load(d, d.find_element(By.CSS_SELECTOR, ".gallery a"))
    wait_until(lambda: images_loaded(d, "[data-full-image]"), 30, "the full image to load", svc.logs_tail)
    row_text = d.find_element(By.CSS_SELECTOR, "table.manifest-row").text
    assert "seed" in row_text and "normal" in row_text and "sampler ddim" in row_text
    screenshot(d, "06-image")

    # 5. Downloads. The dataset zip: a file when the privacy gate lets it out, else the API's 409 in words.
    d.get(f"{base}/console/datasets/{dataset_id}")
    d.find_element(By.CSS_SELECTOR, 'a[data-format="zip"]').click()
    allowed = httpx.get(f"{base}/v1/datasets/{dataset_id}/download", params={"format": "zip"},
                        headers={"Authorization": f"Bearer {key_a}"})
    if allowed.status_code == 200:
        zips = wait_until(lambda: [p for p in d.downloads.glob("*.zip") if p.stat().st_size > 0
                                   and not list(d.downloads.glob("*.crdownload"))], 60, "the zip download",
                          svc.logs_tail)
        with zipfile.ZipFile(zips[0]) as zf:
            assert len([n for n in zf.namelist() if n.endswith(".png")]) == 4
            assert any(n.endswith("manifest.csv") for n in zf.namelist())
    else:
        assert allowed.status_code == 409, allowed.text
        detail = allowed.json()["detail"]
        wait_until(lambda: detail in d.find_element(By.TAG_NAME, "main").text, 30, f"the 409 page ({gate})",
                   svc.logs_tail)
    # The built-in generator's zip (never gated).
    d.get(f"{base}/console/generators")
    click_and_load(d, d.find_element(By.LINK_TEXT, "generator-tiny"))
    assert d.find_element(By.CSS_SELECTOR, ".model-card").text.strip()
    screenshot(d, "07-generator")
    before = set(d.downloads.glob("*.zip"))
    d.find_element(By.PARTIAL_LINK_TEXT, "Download generator-tiny").click()
    new_zip = wait_until(lambda: [p for p in set(d.downloads.glob("*.zip")) - before if p.stat().st_size > 0
                                  and not list(d.downloads.glob("*.crdownload"))], 60, "the generator download",
                         svc.logs_tail)[0]
    with zipfile.ZipFile(new_zip) as zf:
        assert "cxrsynth.json" in zf.namelist()

    # 6. Reports render (privacy: whatever the gate recorded, or "not run").
    d.get(f"{base}/console/reports")
    assert "Privacy of synthetic datasets" in d.find_element(By.TAG_NAME, "h2").text
    screenshot(d, "08-reports")
    d.get(f"{base}/console/datasets/{dataset_id}/report")
    screenshot(d, "09-privacy-report")

    # 7. Another tenant's ids answer "not found", like unknown ones.
    d.get(f"{base}/console/datasets/{foreign_dataset}")
    assert d.find_element(By.TAG_NAME, "h1").text == "Not found"
    assert d.find_element(By.CSS_SELECTOR, ".error-code").text == "404"
    screenshot(d, "10-not-found")
    d.get(f"{base}/console/datasets/{foreign_dataset}/download?format=zip")
    assert d.find_element(By.TAG_NAME, "h1").text == "Not found"
    assert not [p for p in d.downloads.iterdir() if foreign_dataset[:8] in p.name]

    # 8. Log out: the console asks for a key again.
    d.get(f"{base}/console/jobs")
    click_and_load(d, d.find_element(By.CSS_SELECTOR, ".who button[type=submit]"))
    assert "/console/login" in d.current_url
    d.get(f"{base}/console/datasets/{dataset_id}")
    assert "/console/login" in d.current_url
