"""Web console: server-side latency of each page, next to the JSON API call that carries the same data.

In-process (FastAPI ``TestClient``, no network) on the embedded stack (SQLite, local object folder), one
tenant with ``--jobs`` jobs and a synthetic dataset of ``--images`` images (real PneumoniaMNIST images at
64 px when ``../shared/data`` is there, else grey squares; the console only signs their URLs). Each page
is requested ``--requests`` times after 3 warm-ups, one at a time; the table gives median and p95 in ms
and the HTML size. What it shows: what rendering a page adds over the API call it mirrors.

    .venv/bin/python benchmarks/console_pages.py --images 500 --jobs 50 --requests 40
"""

from __future__ import annotations

import argparse
import io
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS_DIR, write_result


def _png(i: int, pool: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    if pool is not None:
        Image.fromarray(pool[i % len(pool)]).resize((64, 64)).save(buf, "PNG")
    else:
        Image.new("L", (64, 64), (i * 37) % 256).save(buf, "PNG")
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import numpy as np
    from fastapi.testclient import TestClient

    from app.core.config import WEIGHTS_DIR, Settings
    from app.db.orm import Dataset, Job
    from app.db.session import get_sessionmaker
    from app.main import create_app
    from app.services.tenants import create_tenant
    from app.storage.base import build_store
    from tests.support import DATA_DIR

    npz = DATA_DIR / "pneumoniamnist" / "pneumoniamnist_28.npz"
    pool = np.load(npz)["val_images"][:200] if npz.is_file() else None
    tmp = Path(tempfile.mkdtemp(prefix="cxr-console-bench-"))
    settings = Settings(_env_file=None, data_dir=tmp, default_generator_dir=WEIGHTS_DIR / "generator-kermany-64",  # type: ignore[call-arg]
                        public_base_url="http://testserver")
    store = build_store(settings)
    rows: list[dict[str, Any]] = []
    with TestClient(create_app(settings, store)) as client:
        with get_sessionmaker(settings.database_url)() as s:
            tenant, key = create_tenant(s, "bench")
            for i in range(args.jobs):
                s.add(Job(tenant_id=tenant.id, kind="generation", status="succeeded" if i else "running",
                          params={"n": 8}, progress_step=4, progress_total=8))
            ds = Dataset(tenant_id=tenant.id, name="bench", origin="synthetic", status="ready", prefix="",
                         num_images=args.images, label_counts={}, gate_status="passed",
                         privacy={"rejected": 0, "memorisation_rate_after": 0.0})
            s.add(ds)
            s.flush()
            ds.prefix = f"tenants/{tenant.id}/datasets/{ds.id}/images"
            ds.manifest_key = f"tenants/{tenant.id}/datasets/{ds.id}/manifest.csv"
            lines = ["file,label,sha256,index,seed,sampler,steps,guidance,generator_id"]
            counts = {"normal": 0, "pneumonia": 0}
            for i in range(args.images):
                label = "normal" if i % 3 == 0 else "pneumonia"
                counts[label] += 1
                store.put_bytes(f"{ds.prefix}/{label}/{i:07d}.png", _png(i, pool), "image/png")
                lines.append(f"{label}/{i:07d}.png,{label},{'0' * 64},{i},{i},dpmsolver++,20,2.0,g")
            store.put_bytes(ds.manifest_key, ("\n".join(lines) + "\n").encode(), "text/csv")
            ds.label_counts = counts
            s.commit()
            ds_id = ds.id
        token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/console/login").text).group(1)  # type: ignore[union-attr]
        client.post("/console/login", data={"api_key": key, "csrf_token": token})
        gen_id = re.search(r"/console/generators/([0-9a-f]{32})", client.get("/console/generators").text).group(1)  # type: ignore[union-attr]
        api = {"Authorization": f"Bearer {key}"}
        last_page = (counts["pneumonia"] - 1) // 24 + 1
        cases = [
            ("console: jobs (20 rows + form)", "/console/jobs", None),
            ("api: GET /v1/jobs?limit=20", "/v1/jobs?limit=20", api),
            ("console: gallery page 1 (24 thumbnails)", f"/console/datasets/{ds_id}", None),
            ("api: GET /v1/datasets/{id}/images?limit=24", f"/v1/datasets/{ds_id}/images?limit=24", api),
            (f"console: gallery, label filter, last page ({last_page})",
             f"/console/datasets/{ds_id}?label=pneumonia&page={last_page}", None),
            ("console: one image + manifest row", f"/console/datasets/{ds_id}/images/{args.images // 2}", None),
            ("console: reports", "/console/reports", None),
            ("console: generator model card", f"/console/generators/{gen_id}", None),
        ]
        for name, path, headers in cases:
            for _ in range(3):
                assert client.get(path, headers=headers).status_code == 200, path
            times, size = [], 0
            for _ in range(args.requests):
                t0 = time.perf_counter()
                r = client.get(path, headers=headers)
                times.append((time.perf_counter() - t0) * 1000)
                assert r.status_code == 200, (path, r.status_code)
                size = len(r.content)
            times.sort()
            rows.append({"page": name, "path": path.replace(ds_id, "{id}").replace(gen_id, "{id}"),
                         "median_ms": round(statistics.median(times), 1),
                         "p95_ms": round(times[min(len(times) - 1, int(0.95 * len(times)))], 1), "bytes": size})
    print(f"{'page':55s} {'median ms':>10s} {'p95 ms':>8s} {'bytes':>8s}")
    for r in rows:
        print(f"{r['page']:55s} {r['median_ms']:10.1f} {r['p95_ms']:8.1f} {r['bytes']:8d}")
    payload = {"sizes": {"images": args.images, "jobs": args.jobs, "requests_per_page": args.requests,
                         "real_images": pool is not None},
               "how": "in-process TestClient, embedded stack (SQLite, local folder), sequential requests",
               "rows": rows}
    path = write_result("console_pages", payload, args.out)
    md = [f"# Web console page latency\n\n`{json.loads(path.read_text())['command']}` — "
          f"{args.images} images, {args.jobs} jobs, {args.requests} requests per page after 3 warm-ups, "
          "in-process (no network), embedded stack, on a shared 2-core CPU machine.\n",
          "| page | median ms | p95 ms | bytes |", "|---|---:|---:|---:|"]
    md += [f"| {r['page']} | {r['median_ms']} | {r['p95_ms']} | {r['bytes']} |" for r in rows]
    (RESULTS_DIR if args.out is None else args.out.parent).joinpath("console_pages.md").write_text("\n".join(md) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
