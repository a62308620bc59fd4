"""Pretraining streamed from WebDataset shards: every sample once per epoch, a seeded order, exact resume,
the export layout, and clear errors for empty, damaged or unusable data."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import models.ssl.stream as stream_module
from models.callbacks import Canceled
from models.data.folders import AspectMode
from models.release.card import CardInputs
from models.release.manifest import BASE_FIELDS, ManifestRow
from models.release.writers import ReleaseRecord, ReleaseSpec, write_webdataset
from models.ssl import (
    LocalShards,
    PretrainConfig,
    ShardSource,
    ShardStream,
    build_ssl_model,
    create_backbone,
    index_shards,
    load_checkpoint,
    pretrain,
    pretraining_dataset,
)
from models.ssl.data import FolderImages
from models.ssl.shards import parse_s3_url
from models.ssl.stream import distributed_rank

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZES = (7, 7, 7, 3)  # uneven on purpose: 24 samples, B = 4 -> 6 steps per epoch
N = sum(SIZES)


def png(k: int, size: tuple[int, int] = (32, 32)) -> bytes:
    """A grey PNG whose pixels encode ``k`` (a gradient offset by it), distinct for every k < 256."""
    w, h = size
    pixels = (np.add.outer(np.arange(h), np.arange(w)) + k * 5) % 256
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), mode="L").save(buf, "PNG")
    return buf.getvalue()


def write_shards(root: Path, sizes: Sequence[int] = SIZES) -> list[str]:
    """Shards ``s-NNN.tar`` of samples ``kNNN`` (``png`` + ``json`` label + ``cls``); returns every key."""
    root.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for j, n in enumerate(sizes):
        with wds.TarWriter(str(root / f"s-{j:03d}.tar")) as writer:
            for _ in range(n):
                k = len(keys)
                keys.append(f"k{k:03d}")
                label = ("normal", "pneumonia")[k % 2]
                writer.write({"__key__": keys[-1], "png": png(k), "json": json.dumps({"label": label}).encode(),
                              "cls": str(k % 2).encode()})
    return keys


def write_export(tmp_path: Path, n: int, shard_size: int) -> Path:
    """A dataset exported with ``write_webdataset`` and extracted: ``shards/``, ``manifest.csv``, ``card.json``."""
    items = []
    for i in range(n):
        label = ("normal", "pneumonia")[i % 2]
        data = png(i)
        items.append(ReleaseRecord(ManifestRow(f"{label}/{i:05d}.png", label, hashlib.sha256(data).hexdigest()),
                                   partial(bytes, data)))
    card = CardInputs(dataset_id="ds-1", name="stream test", origin="synthetic", num_images=n,
                      label_counts={}, manifest_sha256="0" * 64)
    spec = ReleaseSpec(card=card, manifest_columns=BASE_FIELDS, label_ids={"normal": 0, "pneumonia": 1},
                       shard_size=shard_size)
    archive = tmp_path / "export.tar"
    write_webdataset(archive, items, spec)
    out = tmp_path / "export"
    with tarfile.open(archive) as tf:
        tf.extractall(out, filter="data")
    return out


def steps_of(stream: ShardStream) -> list[list[str]]:
    """The keys of each batch, read through a DataLoader with the stream's own batch size and workers."""
    loader = DataLoader(stream, batch_size=stream.batch_size, num_workers=stream.num_workers)
    out = []
    for keys, images in loader:
        assert images.shape == (len(keys), 1, 32, 32) and images.dtype == torch.uint8
        out.append(list(keys))
    return out


@pytest.fixture
def shards(tmp_path: Path) -> tuple[Path, list[str]]:
    root = tmp_path / "shards"
    return root, write_shards(root)


@pytest.mark.parametrize("workers", [0, 2])
def test_every_key_once_per_epoch(shards: tuple[Path, list[str]], workers: int) -> None:
    root, keys = shards
    index = index_shards(LocalShards(root))
    assert index.counts == SIZES and index.counted_from == "tar headers"
    assert index.labels == {"normal": 12, "pneumonia": 12}  # the .json label wins over .cls
    stream = ShardStream(index, 32, batch_size=4, seed=1, total_steps=12, num_workers=workers, with_keys=True)
    flat = [k for batch in steps_of(stream) for k in batch]
    assert len(flat) == 2 * N
    for epoch in (flat[:N], flat[N:]):
        assert sorted(epoch) == keys  # none missing, none twice
    assert flat[:N] != flat[N:]


def test_images_are_the_samples_of_their_keys(shards: tuple[Path, list[str]]) -> None:
    root, keys = shards
    index = index_shards(LocalShards(root))
    got = dict(ShardStream(index, 32, with_keys=True))  # default: one epoch, one sample per step
    assert sorted(got) == keys
    for key, image in got.items():
        expected = np.array(Image.open(io.BytesIO(png(int(key[1:])))))
        assert torch.equal(image, torch.from_numpy(expected).unsqueeze(0)), key


def test_order_is_a_function_of_seed_and_epoch(shards: tuple[Path, list[str]]) -> None:
    index = index_shards(LocalShards(shards[0]))

    def order(seed: int) -> list[str]:
        return [k for k, _ in ShardStream(index, 32, seed=seed, total_steps=2 * N, with_keys=True)]

    a, again, other = order(3), order(3), order(4)
    assert a == again
    assert a[:N] != a[N:] and sorted(a[:N]) == sorted(a[N:])  # epochs differ, each covers every key
    assert a != other


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_stream_reads_the_batches_of_the_uninterrupted_one(
    shards: tuple[Path, list[str]], workers: int, monkeypatch: pytest.MonkeyPatch,
) -> None:
    index = index_shards(LocalShards(shards[0]))
    stream = ShardStream(index, 32, batch_size=4, seed=5, total_steps=14, num_workers=workers, with_keys=True)
    full = steps_of(stream)
    for start in (3, 7):  # mid epoch 0 (odd: worker 0 then plays the second reader) and in epoch 1
        assert steps_of(stream.configured(start_step=start)) == full[start:], start
    if workers == 0:  # skipped samples are never decoded (decoding happens in this process here)
        calls: list[int] = []
        real = stream_module.decode_grey

        def counting(data: bytes, resolution: int, aspect_mode: AspectMode, where: str) -> torch.Tensor:
            calls.append(1)
            return real(data, resolution, aspect_mode, where)

        monkeypatch.setattr(stream_module, "decode_grey", counting)
        assert steps_of(stream.configured(start_step=11)) == full[11:]
        assert len(calls) == 3 * 4


def test_distributed_ranks_share_each_epoch(shards: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    assert distributed_rank() == (1, 2)
    root, keys = shards
    index = index_shards(LocalShards(root))
    per_rank = []
    for rank in (0, 1):
        monkeypatch.setattr(stream_module, "distributed_rank", lambda rank=rank: (rank, 2))
        stream = ShardStream(index, 32, batch_size=4, seed=0, num_workers=0, with_keys=True)  # one epoch
        per_rank.append([k for k, _ in stream])
    assert len(per_rank[0]) == len(per_rank[1]) == N // 2  # 3 steps of 4 on each rank
    assert sorted(per_rank[0] + per_rank[1]) == keys


def test_shards_decode_like_the_folder_path(tmp_path: Path) -> None:
    sizes = [(32, 32), (40, 24), (20, 50)]  # square, wide and tall: the same aspect handling (pad)
    (tmp_path / "folder").mkdir()
    with wds.TarWriter(str(tmp_path / "s-000.tar")) as writer:
        for k, size in enumerate(sizes):
            data = png(k, size)
            (tmp_path / "folder" / f"k{k:03d}.png").write_bytes(data)
            writer.write({"__key__": f"k{k:03d}", "png": data})
    streamed, summary = pretraining_dataset(tmp_path, 32)
    assert isinstance(streamed, ShardStream) and summary.num_images == 3 and summary.counts == {"unlabelled": 3}
    got = dict(streamed.configured(with_keys=True))
    folder = FolderImages(sorted((tmp_path / "folder").iterdir()), 32, "pad")
    for k in range(3):
        assert torch.equal(got[f"k{k:03d}"], folder[k]), sizes[k]


def test_pretraining_on_an_export_resumes_exactly(tmp_path: Path) -> None:
    data = write_export(tmp_path, n=20, shard_size=6)  # shards of 6, 6, 6, 2
    cfg = PretrainConfig.tiny(method="dino", max_steps=5, checkpoint_every=2, num_workers=2)
    _, summary = pretraining_dataset(data, cfg.resolution)
    assert summary.num_images == 20 and summary.counts == {"normal": 10, "pneumonia": 10}
    full = pretrain(data, cfg, tmp_path / "full", checkpoint_dir=tmp_path / "ck-full", device="cpu")
    assert full.data.source == "export" and full.data.num_images == 20

    def cancel_at_3(step: int, total: int, message: str) -> None:
        if step == 3:
            raise Canceled

    with pytest.raises(Canceled):
        pretrain(data, cfg, None, checkpoint_dir=tmp_path / "ck", on_step=cancel_at_3, device="cpu")
    assert load_checkpoint(tmp_path / "ck")["step"] == 3  # odd: the resumed loader starts on the other reader
    resumed = pretrain(data, cfg, tmp_path / "resumed", checkpoint_dir=tmp_path / "ck", resume=True, device="cpu")
    assert resumed.steps == 5 and resumed.losses == full.losses
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_export_whose_manifest_disagrees_is_refused(tmp_path: Path) -> None:
    data = write_export(tmp_path, n=8, shard_size=3)
    index = index_shards(LocalShards(data))
    assert index.counts == (3, 3, 2) and index.counted_from == "manifest + tar headers"
    (data / "shards" / "data-000001.tar").unlink()
    with pytest.raises(ValueError, match=r"does not match its shards.*data-000001\.tar"):
        index_shards(LocalShards(data))


def test_empty_shard_folders_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no WebDataset shards"):
        index_shards(LocalShards(tmp_path / "empty"))
    (tmp_path / "export" / "shards").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no WebDataset shards \(\*\.tar\) in .*export/shards"):
        pretraining_dataset(tmp_path / "export", 32)
    (tmp_path / "hollow").mkdir()
    wds.TarWriter(str(tmp_path / "hollow" / "s-000.tar")).close()  # a sound tar with no samples
    with pytest.raises(ValueError, match="hold no samples"):
        pretraining_dataset(tmp_path / "hollow", 32)


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    if how == "cut mid-member":
        data = data[: len(data) // 2 + 100]
    elif how == "cut on a member boundary":  # tarfile reads this as a shorter, valid archive
        data = data[: members[3].offset]
    else:  # a garbled header mid-archive: tarfile stops there without an error
        data[members[3].offset : members[3].offset + 100] = b"\xff" * 100
    path.write_bytes(bytes(data))


class StreamedFolder(LocalShards):
    """A folder counted the way a remote source is: each shard streamed once (``ShardSource.count``)."""

    cheap_count = False
    count = ShardSource.count


@pytest.mark.parametrize("source", [LocalShards, StreamedFolder])
@pytest.mark.parametrize("how", ["cut mid-member", "cut on a member boundary", "garbled header"])
def test_a_damaged_shard_is_named(shards: tuple[Path, list[str]], how: str, source: type[LocalShards]) -> None:
    root, _ = shards
    index = index_shards(source(root))
    _damage(root / "s-001.tar", how)
    with pytest.raises(ValueError, match=r"corrupt or truncated shard .*s-001\.tar"):
        index_shards(source(root))  # before training starts
    with pytest.raises(ValueError, match=r"shard .*s-001\.tar"):
        list(ShardStream(index, 32))  # damaged after it was indexed: the stream reports it too


def test_a_sample_without_an_image_is_named(tmp_path: Path) -> None:
    with wds.TarWriter(str(tmp_path / "s-000.tar")) as writer:
        writer.write({"__key__": "good", "png": png(1)})
        writer.write({"__key__": "bad", "json": b'{"label": "normal"}', "cls": b"0"})
    with pytest.raises(ValueError, match=r"sample 'bad' in shard .*s-000\.tar has no image.*cls, json"):
        index_shards(LocalShards(tmp_path))


def test_a_resolution_the_backbone_cannot_take_fails_before_training(shards: tuple[Path, list[str]]) -> None:
    with pytest.raises(ValueError, match="resolution 40 px is not a multiple of the patch size 16 of test_vit"):
        build_ssl_model(PretrainConfig.tiny(backbone="test_vit", backbone_kwargs={}, resolution=40))
    with pytest.raises(ValueError, match="local crop size 24 px is not a multiple of the patch size 16"):
        build_ssl_model(PretrainConfig.tiny(backbone="test_vit", backbone_kwargs={}, local_resolution=24))
    with pytest.raises(ValueError, match="resolution 16 px is below the minimum of one 32 px patch"):
        create_backbone("test_vit", 16, {"patch_size": 32})
    steps: list[int] = []
    with pytest.raises(ValueError, match="patch size 16"):
        pretrain(shards[0], PretrainConfig.tiny(backbone="test_vit", backbone_kwargs={}, resolution=40), None,
                 on_step=lambda s, t, m: steps.append(s), device="cpu")
    assert steps == []
    assert build_ssl_model(PretrainConfig.tiny(backbone="test_vit", backbone_kwargs={})) is not None  # 32/16 fit


def test_s3_urls_name_a_folder_prefix() -> None:
    assert parse_s3_url("s3://bucket/a/b") == ("bucket", "a/b/")
    assert parse_s3_url("s3://bucket/a/b/") == ("bucket", "a/b/")
    assert parse_s3_url("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError, match="not an s3://"):
        parse_s3_url("/data/shards")
