"""Pretraining data streamed from WebDataset shards in S3 (SeaweedFS): every key once, the export layout,
``s3://`` URLs with the AWS environment variables, and an empty prefix."""

from __future__ import annotations

from pathlib import Path

import pytest
from minio import Minio

from models.ssl import PretrainConfig, S3Shards, ShardStream, index_shards, pretrain, pretraining_dataset
from tests.support import S3Server, new_bucket_name
from tests.unit.test_ssl_data_stream import steps_of, write_export, write_shards

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture
def bucket(seaweed: S3Server) -> tuple[Minio, str]:
    """A client of the session's SeaweedFS and a new, empty bucket."""
    client = Minio(seaweed.endpoint, seaweed.access_key, seaweed.secret_key, secure=False, region=seaweed.region)
    name = new_bucket_name()
    client.make_bucket(name)
    return client, name


def upload(client: Minio, bucket: str, folder: Path, prefix: str) -> None:
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        client.fput_object(bucket, prefix + path.relative_to(folder).as_posix(), str(path))


def test_two_shards_stream_from_s3_every_key_once(bucket: tuple[Minio, str], seaweed: S3Server,
                                                  tmp_path: Path) -> None:
    client, name = bucket
    keys = write_shards(tmp_path / "local", sizes=(5, 4))
    upload(client, name, tmp_path / "local", "sets/run1/")
    upload(client, name, tmp_path / "local", "sets/run10/")  # a sibling prefix must not leak in
    by_keys = S3Shards(f"s3://{name}/sets/run1", endpoint=seaweed.endpoint, access_key=seaweed.access_key,
                       secret_key=seaweed.secret_key, secure=False, region=seaweed.region)
    by_client = S3Shards(f"s3://{name}/sets/run1/", client)
    for source in (by_keys, by_client):
        index = index_shards(source)  # no manifest: both shards are streamed once and counted
        assert index.shards == ("s-000.tar", "s-001.tar") and index.counts == (5, 4)
        assert index.labels == {"normal": 5, "pneumonia": 4} and index.counted_from == "tar headers"
        stream = ShardStream(index, 32, batch_size=3, seed=2, total_steps=6, num_workers=2, with_keys=True)
        flat = [k for batch in steps_of(stream) for k in batch]
        assert sorted(flat[:9]) == keys and sorted(flat[9:]) == keys  # two epochs, every key once in each
        assert steps_of(stream.configured(start_step=3)) == steps_of(stream)[3:]


def test_pretraining_from_an_s3_url_of_an_export(bucket: tuple[Minio, str], seaweed: S3Server, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    client, name = bucket
    upload(client, name, write_export(tmp_path, n=10, shard_size=4), "exports/ds-1/")
    monkeypatch.setenv("AWS_ENDPOINT_URL", seaweed.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweed.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweed.secret_key)
    monkeypatch.setenv("AWS_REGION", seaweed.region)
    url = f"s3://{name}/exports/ds-1"
    dataset, summary = pretraining_dataset(url, 32)
    assert isinstance(dataset, ShardStream) and dataset.index.counted_from == "manifest"
    assert dataset.index.shards == ("shards/data-000000.tar", "shards/data-000001.tar", "shards/data-000002.tar")
    assert summary.source == url + "/" and summary.num_images == 10 and summary.counts == {"normal": 5, "pneumonia": 5}
    result = pretrain(url, PretrainConfig.tiny(method="simclr", max_steps=2), None, device="cpu")
    assert result.steps == 2 and result.data.num_images == 10
    with pytest.raises(ValueError, match=rf"no WebDataset shards \(\*\.tar\) under s3://{name}/exports/none/"):
        pretraining_dataset(f"s3://{name}/exports/none", 32)
