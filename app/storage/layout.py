"""Where a dataset's objects live, and the small status object of an export build in flight: the layout
the API (signed links, 202 while building) and the worker (which builds) share.

Key layout of a dataset ``id`` of tenant ``t``::

    tenants/t/datasets/id/images/LABEL/NAME.png       uploads (registered prefixes stay where they are)
    tenants/t/datasets/id/manifest.csv                file,label,sha256 (file relative to Dataset.prefix)
    tenants/t/datasets/id/exports/id.zip              zip export; id-webdataset.tar, id-dicom.zip likewise
    tenants/t/datasets/id/exports/FORMAT.status.json  a build in flight (or failed), see below
"""

from __future__ import annotations

import json
import time
from typing import Any, Protocol

from app.storage.base import ObjectNotFound, ObjectStore, tenant_key
from models.release.writers import SUFFIX


class DatasetKeys(Protocol):
    """What the layout reads of a dataset row."""

    id: str
    tenant_id: str
    prefix: str


def dataset_root(ds: DatasetKeys) -> str:
    """``tenants/{t}/datasets/{id}``: where the service keeps a dataset's own objects."""
    return tenant_key(ds.tenant_id, "datasets", ds.id)


def dataset_export_key(ds: DatasetKeys, fmt: str = "zip") -> str:
    """Key of a dataset's export in ``fmt`` (``exports/ID.zip``, ``ID-webdataset.tar``, ``ID-dicom.zip``)."""
    return tenant_key(ds.tenant_id, "datasets", ds.id, "exports", f"{ds.id}{SUFFIX[fmt]}")


def dataset_image_key(ds: DatasetKeys, file: str) -> str:
    """Object key of a manifest ``file`` of ``ds``."""
    return f"{ds.prefix.rstrip('/')}/{file}"


def export_status_key(ds: DatasetKeys, fmt: str) -> str:
    """Key of the small JSON that tracks a build of ``fmt`` in flight (or failed)."""
    return tenant_key(ds.tenant_id, "datasets", ds.id, "exports", f"{fmt}.status.json")


def read_export_status(store: ObjectStore, key: str) -> dict[str, Any] | None:
    """The status object at ``key`` (``status``: building | failed, ``attempts``, ``done``, ``total``,
    ``error``, ``updated``), or ``None`` when there is none (or it is unreadable)."""
    try:
        data = json.loads(store.get_bytes(key))
    except (ObjectNotFound, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_export_status(store: ObjectStore, key: str, **status: Any) -> None:
    """Write the status object at ``key``, stamped with the time (``updated``)."""
    store.put_bytes(key, json.dumps({**status, "updated": time.time()}).encode(), "application/json")
