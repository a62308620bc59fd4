"""Export writers: zip, WebDataset shards and DICOM, streamed one image at a time.

Each writer consumes an iterable of :class:`ReleaseRecord` (a manifest row and a function that reads
that image's bytes) exactly once and writes one archive file:

* ``zip``: ``LABEL/NAME.png`` as stored, ``manifest.csv``, ``card.json``, ``README.md``;
* ``webdataset``: a tar holding ``shards/data-NNNNNN.tar`` WebDataset shards (``KEY.png``, ``KEY.json``
  with the image's manifest row, ``KEY.cls`` with its label id; ``shard_size`` samples per shard),
  ``manifest.csv`` (+ ``shard``, ``key``), ``card.json``, ``README.md``;
* ``dicom``: a zip of ``LABEL/NAME.dcm`` Secondary Capture files (:mod:`models.release.dicom`),
  ``manifest.csv`` (+ ``dicom_file``, ``sop_instance_uid``), ``card.json``, ``README.md``.

Image data never accumulates: one image is held at a time (plus a bounded prefetch window), the
export's manifest is spooled to a temporary file, and each finished WebDataset shard is moved into the
archive and deleted. A zip's central directory, which ``zipfile`` would keep in memory as one ``ZipInfo``
per member (about 0.4 KB each, 40 MB at 100k images), is spilled to a temporary file as well
(:func:`streaming_zip`). Archives are deterministic (fixed timestamps, owners and member
order), so exporting the same dataset twice gives the same bytes.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import tarfile
import tempfile
import zipfile
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any, Literal, TypeVar, get_args

from models.callbacks import OnStep, no_progress
from models.release.card import CardInputs, card_markdown, dataset_card
from models.release.dicom import SyntheticDicomEncoder, patient_id, pixels_of
from models.release.manifest import ManifestRow, ManifestWriter

ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
TAR_MTIME = 315532800  # 1980-01-01T00:00:00Z, the zip epoch: fixed so archives are reproducible
TAR_OWNER = "cxrsynth"
DEFAULT_SHARD_SIZE = 1000
PROGRESS_EVERY = 64
_ALREADY_COMPRESSED = (".png", ".jpg", ".jpeg", ".zip", ".tar", ".gz", ".safetensors")

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class ReleaseRecord:
    """One image to export: its manifest row and a function returning its stored bytes."""

    row: ManifestRow
    read: Callable[[], bytes]


@dataclass(frozen=True)
class ReleaseSpec:
    """What every writer needs besides the records."""

    card: CardInputs
    manifest_columns: Sequence[str]
    label_ids: Mapping[str, int]
    extra_files: Mapping[str, bytes] = field(default_factory=dict)  # top-level members written as given
    shard_size: int = DEFAULT_SHARD_SIZE
    read_workers: int = 1  # >1 reads images ahead in threads (object stores answer with latency)
    prefetch: int = 16


@dataclass(frozen=True)
class ReleaseResult:
    """What a writer wrote."""

    format: str
    path: Path
    num_images: int
    image_bytes: int  # bytes of the source images read
    archive_bytes: int
    card: dict[str, Any]


def ordered_prefetch(items: Iterable[T], fn: Callable[[T], R], workers: int, window: int) -> Iterator[tuple[T, R]]:
    """``(item, fn(item))`` in input order, computing up to ``window`` results ahead on ``workers`` threads.

    Hand-written because ``Executor.map`` submits every item at once: on 100k images that would hold
    every image in memory. Here at most ``window`` results exist at any time.
    """
    if workers <= 1:
        for item in items:
            yield item, fn(item)
        return
    it = iter(items)
    pending: deque[tuple[T, Future[R]]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="release-read") as pool:
        try:
            for item in it:
                pending.append((item, pool.submit(fn, item)))
                if len(pending) >= window:
                    head, fut = pending.popleft()
                    yield head, fut.result()
            while pending:
                head, fut = pending.popleft()
                yield head, fut.result()
        finally:
            for _, fut in pending:
                fut.cancel()


def _check_member(name: str) -> str:
    # String checks, not PurePosixPath: pathlib interns every path part, which grows with N.
    if not name or name.startswith(("/", ".")) or "\\" in name or ".." in name.split("/"):
        raise ValueError(f"unsafe file name in the manifest: {name!r}")
    return name


class _SpilledInfoList:
    """Stands in for ``ZipFile.filelist``: pickles each finished ``ZipInfo`` to a temporary file.

    Hand-written because ``zipfile`` keeps every member's ``ZipInfo`` until ``close()`` writes the
    central directory, so memory grows with N. ``zipfile`` only appends a member's info once it is
    complete (sizes, CRC), asks the list's length, and iterates it once in ``close()``: this supports
    exactly that (pinned by tests/unit/test_release_formats.py).
    """

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close())
        self._count = 0

    def append(self, info: zipfile.ZipInfo) -> None:
        pickle.dump(info, self._file, protocol=pickle.HIGHEST_PROTOCOL)
        self._count += 1

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[zipfile.ZipInfo]:
        self._file.seek(0)
        for _ in range(self._count):
            yield pickle.load(self._file)  # our own temporary file, written above
        self._file.seek(0, io.SEEK_END)

    def close(self) -> None:
        self._file.close()


class _NoNameIndex(dict[str, zipfile.ZipInfo]):
    """Stands in for ``ZipFile.NameToInfo`` (used for look-ups we never make): remembers nothing."""

    def __setitem__(self, key: str, value: zipfile.ZipInfo) -> None:
        return None


@contextmanager
def streaming_zip(path: Path) -> Iterator[zipfile.ZipFile]:
    """A ``zipfile.ZipFile`` for writing whose memory does not grow with the number of members."""
    infos = _SpilledInfoList()
    try:
        with zipfile.ZipFile(path, "w", allowZip64=True) as zf:
            zf.filelist = infos  # type: ignore[assignment]
            zf.NameToInfo = _NoNameIndex()
            yield zf
    finally:
        infos.close()


def _zip_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
    info.compress_type = (zipfile.ZIP_STORED if name.lower().endswith(_ALREADY_COMPRESSED)
                          else zipfile.ZIP_DEFLATED)
    info.external_attr = 0o644 << 16
    return info


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, TAR_MTIME, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = TAR_OWNER
    return info


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n").encode()


def _metadata_members(spec: ReleaseSpec, export: Mapping[str, Any],
                      progress: _Progress) -> tuple[list[tuple[str, bytes]], dict[str, Any]]:
    # The card counts what this archive holds (not what the caller expected).
    inputs = replace(spec.card, num_images=progress.done, label_counts=dict(sorted(progress.labels.items())))
    card = dataset_card(inputs, export)
    members = [*spec.extra_files.items(), ("card.json", _json_bytes(card)),
               ("README.md", card_markdown(card).encode())]
    return members, card


class _Progress:
    """Counts images (and per label) and reports every ``PROGRESS_EVERY`` images."""

    def __init__(self, on_step: OnStep, total: int | None, fmt: str) -> None:
        self.on_step, self.total, self.fmt, self.done = on_step, total or 0, fmt, 0
        self.labels: Counter[str] = Counter()

    def tick(self, label: str) -> None:
        self.done += 1
        self.labels[label or "unlabelled"] += 1
        if self.done % PROGRESS_EVERY == 0:
            self.on_step(self.done, max(self.total, self.done), f"{self.fmt}: {self.done} images")

    def finish(self) -> None:
        self.on_step(self.done, max(self.total, self.done), f"{self.fmt}: {self.done} images written")


def _manifest_file() -> tuple[IO[bytes], io.TextIOWrapper]:
    """A temporary file for the export's manifest (so 100k rows never sit in memory) and a text view."""
    raw = tempfile.TemporaryFile("w+b")  # noqa: SIM115 (closed by the writer's with-block)
    return raw, io.TextIOWrapper(raw, encoding="utf-8", newline="")


def _finish_manifest(raw: IO[bytes], text: io.TextIOWrapper) -> int:
    """Flush and detach the text view, rewind ``raw``; returns the manifest's size in bytes."""
    text.flush()
    text.detach()
    raw.seek(0, io.SEEK_END)
    size = raw.tell()
    raw.seek(0)
    return size


def _label_id(spec: ReleaseSpec, label: str) -> int:
    return spec.label_ids.get(label or "unlabelled", -1)


def _records(records: Iterable[ReleaseRecord], spec: ReleaseSpec) -> Iterator[tuple[ReleaseRecord, bytes]]:
    return ordered_prefetch(records, lambda r: r.read(), spec.read_workers, max(1, spec.prefetch))


# --------------------------------------------------------------------------------------------------
# zip
# --------------------------------------------------------------------------------------------------
def write_zip(path: Path, records: Iterable[ReleaseRecord], spec: ReleaseSpec,
              on_step: OnStep = no_progress) -> ReleaseResult:
    """Images as stored (``LABEL/NAME.png``), then ``manifest.csv``, extra files, ``card.json``, ``README.md``."""
    progress = _Progress(on_step, spec.card.num_images, "zip")
    raw, text = _manifest_file()
    image_bytes = 0
    with raw, streaming_zip(path) as zf:
        manifest = ManifestWriter(text, spec.manifest_columns)
        for rec, data in _records(records, spec):
            with zf.open(_zip_info(_check_member(rec.row.file)), "w", force_zip64=True) as dst:
                dst.write(data)
            manifest.write(rec.row)
            image_bytes += len(data)
            progress.tick(rec.row.label)
        _finish_manifest(raw, text)
        with zf.open(_zip_info("manifest.csv"), "w", force_zip64=True) as dst:
            shutil.copyfileobj(raw, dst, 1 << 20)
        export = {"format": "zip", "layout": "LABEL/NAME.png as stored; manifest.csv; card.json; README.md",
                  "manifest_columns": list(spec.manifest_columns),
                  "notes": ["manifest.csv: one row per image; file is the image's path in this zip and sha256 "
                            "the SHA-256 of its bytes"]}
        members, card = _metadata_members(spec, export, progress)
        for name, blob in members:
            zf.writestr(_zip_info(name), blob)
    progress.finish()
    return ReleaseResult("zip", path, progress.done, image_bytes, path.stat().st_size, card)


# --------------------------------------------------------------------------------------------------
# WebDataset
# --------------------------------------------------------------------------------------------------
def _image_ext(file: str) -> str:
    base = file.rsplit("/", 1)[-1]
    ext = base.rsplit(".", 1)[1].lower() if "." in base.lstrip(".") else "png"
    return "jpg" if ext == "jpeg" else ext


def shard_name(k: int) -> str:
    """Member name of shard ``k`` inside a WebDataset export."""
    return f"shards/data-{k:06d}.tar"


def write_webdataset(path: Path, records: Iterable[ReleaseRecord], spec: ReleaseSpec,
                     on_step: OnStep = no_progress) -> ReleaseResult:
    """WebDataset shards (``webdataset.TarWriter``) inside one tar, with manifest and card.

    Shards are rolled here rather than by ``webdataset.ShardWriter`` so each finished shard is moved into
    the archive and deleted at once: a 100k-image export never has more than one shard on disk.
    """
    import webdataset as wds

    if spec.shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    progress = _Progress(on_step, spec.card.num_images, "webdataset")
    raw, text = _manifest_file()
    columns = [*spec.manifest_columns, "shard", "key"]
    image_bytes = 0
    shards = 0
    with tempfile.TemporaryDirectory(prefix="cxr-wds-") as tmp, raw, \
            tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as outer:
        manifest = ManifestWriter(text, columns)
        shard_path = Path(tmp) / "shard.tar"
        writer: Any = None

        def close_shard() -> None:
            nonlocal writer, shards
            if writer is None:
                return
            writer.close()
            writer = None
            with shard_path.open("rb") as f:
                outer.addfile(_tar_info(shard_name(shards), shard_path.stat().st_size), f)
            shard_path.unlink()
            shards += 1

        for i, (rec, data) in enumerate(_records(records, spec)):
            if i % spec.shard_size == 0:
                close_shard()
                writer = wds.TarWriter(str(shard_path), encoder=False, user=TAR_OWNER, group=TAR_OWNER,
                                       mode=0o444, mtime=TAR_MTIME)
            key = f"{i:07d}"
            row = rec.row
            sample = {"__key__": key, _image_ext(row.file): data,
                      "json": json.dumps(row.as_json(), sort_keys=True).encode(),
                      "cls": str(_label_id(spec, row.label)).encode()}
            writer.write(sample)
            manifest.write(row, shard=shard_name(shards), key=key)
            image_bytes += len(data)
            progress.tick(row.label)
        close_shard()
        size = _finish_manifest(raw, text)
        outer.addfile(_tar_info("manifest.csv", size), raw)
        last = max(shards - 1, 0)
        export = {"format": "webdataset", "shards": f"shards/data-{{000000..{last:06d}}}.tar",
                  "num_shards": shards, "samples_per_shard": spec.shard_size,
                  "sample_members": {"KEY.png": "the image as stored", "KEY.json": "its manifest row",
                                     "KEY.cls": "its label id (see label_ids)"},
                  "label_ids": dict(spec.label_ids), "manifest_columns": columns,
                  "notes": ["extract this tar, then: webdataset.WebDataset('shards/data-{000000.."
                            f"{last:06d}}}.tar').decode('pil').to_tuple('png', 'cls')",
                            "manifest.csv: shard and key locate each image; sha256 is of the image bytes"]}
        members, card = _metadata_members(spec, export, progress)
        for name, blob in members:
            outer.addfile(_tar_info(name, len(blob)), io.BytesIO(blob))
    progress.finish()
    return ReleaseResult("webdataset", path, progress.done, image_bytes, path.stat().st_size, card)


# --------------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------------
def dicom_member(file: str) -> str:
    """``LABEL/NAME.dcm`` for a manifest ``file`` ``LABEL/NAME.png``."""
    _check_member(file)
    folder, _, base = file.rpartition("/")
    stem = base.rsplit(".", 1)[0] if "." in base else base
    return f"{folder}/{stem}.dcm" if folder else f"{stem}.dcm"


def write_dicom(path: Path, records: Iterable[ReleaseRecord], spec: ReleaseSpec,
                on_step: OnStep = no_progress) -> ReleaseResult:
    """A zip of one synthetic Secondary Capture DICOM file per image, with manifest and card.

    Only for synthetic datasets: every file says it is synthetic, which would be false for real images.
    """
    if spec.card.origin != "synthetic":
        raise ValueError("DICOM export marks every image synthetic: it is only for synthetic datasets")
    progress = _Progress(on_step, spec.card.num_images, "dicom")
    raw, text = _manifest_file()
    columns = [*spec.manifest_columns, "dicom_file", "sop_instance_uid"]
    image_bytes = 0
    generator_id = (spec.card.generator or {}).get("id")
    encoder = SyntheticDicomEncoder(spec.card.dataset_id)
    with raw, streaming_zip(path) as zf:
        manifest = ManifestWriter(text, columns)
        for i, (rec, data) in enumerate(_records(records, spec)):
            row = rec.row
            member = dicom_member(row.file)
            blob, uids = encoder.encode(pixels_of(data), row, instance_number=i + 1,
                                        series_number=max(_label_id(spec, row.label), 0) + 1,
                                        generator_id=row.generator_id or generator_id)
            zf.writestr(_zip_info(member), blob)
            manifest.write(row, dicom_file=member, sop_instance_uid=uids["sop"])
            image_bytes += len(data)
            progress.tick(row.label)
        _finish_manifest(raw, text)
        with zf.open(_zip_info("manifest.csv"), "w", force_zip64=True) as dst:
            shutil.copyfileobj(raw, dst, 1 << 20)
        export = {"format": "dicom",
                  "layout": "LABEL/NAME.dcm, one DICOM Part 10 file per image; manifest.csv; card.json; README.md",
                  "sop_class": "1.2.840.10008.5.1.4.1.1.7 (Secondary Capture Image Storage)",
                  "transfer_syntax": "1.2.840.10008.1.2.1 (Explicit VR Little Endian)",
                  "identity": {"PatientName": "SYNTHETIC^CXRSYNTH", "PatientID": patient_id(spec.card.dataset_id),
                               "ConversionType": "SYN", "ImageType": "DERIVED\\SECONDARY\\SYNTHETIC",
                               "PatientIdentityRemoved": "YES", "dates": "none"},
                  "uids": "fresh UIDs (pydicom root + SHA-512) derived from the dataset id (study), label "
                          "(series) and file (instance): a re-export is identical",
                  "manifest_columns": columns,
                  "notes": ["one synthetic patient and study per dataset, one series per label",
                            "sha256 in manifest.csv is of the source PNG; the DICOM pixel data equals its pixels"]}
        members, card = _metadata_members(spec, export, progress)
        for name, blob in members:
            zf.writestr(_zip_info(name), blob)
    progress.finish()
    return ReleaseResult("dicom", path, progress.done, image_bytes, path.stat().st_size, card)


@dataclass(frozen=True)
class ExportFormatSpec:
    """One export format: its file name suffix, MIME type, writer, and whether real images may use it."""

    suffix: str
    content_type: str
    writer: Callable[..., ReleaseResult]
    #: why real (non-synthetic) datasets have no export in this format; None: they have one
    synthetic_only: str | None = None


#: The registry of export formats (name -> spec), in the order the API and the CLI list them. The API
#: schema (``DownloadFormat``), ``cxrsynth datasets export --format``, the service and the console read it.
EXPORT_FORMATS: dict[str, ExportFormatSpec] = {
    "zip": ExportFormatSpec(".zip", "application/zip", write_zip),
    "webdataset": ExportFormatSpec("-webdataset.tar", "application/x-tar", write_webdataset),
    "dicom": ExportFormatSpec("-dicom.zip", "application/zip", write_dicom,
                              synthetic_only="DICOM files of this service say every image is synthetic"),
}
FORMATS: tuple[str, ...] = tuple(EXPORT_FORMATS)
REAL_IMAGE_FORMATS: tuple[str, ...] = tuple(n for n, f in EXPORT_FORMATS.items() if f.synthetic_only is None)
SUFFIX: dict[str, str] = {n: f.suffix for n, f in EXPORT_FORMATS.items()}
CONTENT_TYPE: dict[str, str] = {n: f.content_type for n, f in EXPORT_FORMATS.items()}
WRITERS: dict[str, Callable[..., ReleaseResult]] = {n: f.writer for n, f in EXPORT_FORMATS.items()}

# For typing (and FastAPI's query enum) only; the check below keeps it equal to the registry.
ExportFormat = Literal["zip", "webdataset", "dicom"]
if get_args(ExportFormat) != FORMATS:
    raise RuntimeError(f"models.release.writers: the ExportFormat literal {get_args(ExportFormat)} differs from "
                       f"EXPORT_FORMATS {FORMATS}")


def write_release(fmt: str, path: Path, records: Iterable[ReleaseRecord], spec: ReleaseSpec,
                  on_step: OnStep = no_progress) -> ReleaseResult:
    """Write ``records`` as ``fmt`` (``zip`` | ``webdataset`` | ``dicom``) to ``path``."""
    try:
        writer = WRITERS[fmt]
    except KeyError:
        raise ValueError(f"unknown export format {fmt!r}; one of {', '.join(FORMATS)}") from None
    return writer(Path(path), records, spec, on_step=on_step)

