"""Object storage: one ``ObjectStore`` protocol, an S3 backend (minio client) and a local folder."""

from app.storage.base import ObjectInfo, ObjectNotFound, ObjectStore, build_store

__all__ = ["ObjectInfo", "ObjectNotFound", "ObjectStore", "build_store"]
