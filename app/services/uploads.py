"""Upload intake: stream a multipart body to temp files, then validate and normalise its images.

Nothing here touches the database or the object store: :func:`spool_multipart` writes parts under a
temp folder (aborting with 413 past ``max_upload_bytes``) and :func:`prepare_images` checks everything
(image type sniffed from bytes, pixel limits, zip bombs, path tricks) and writes 8-bit grey PNGs beside
them. Only when all of it passed does :mod:`app.services.datasets` store objects and a row, so a rejected
upload leaves no trace.
"""

from __future__ import annotations

import hashlib
import io
import re
import stat
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO

import anyio
import numpy as np
from PIL import Image, UnidentifiedImageError
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.core.config import Settings
from app.core.problems import InvalidInput, PayloadTooLarge, ProblemError
from models.data.folders import SIDECAR_IMAGES

ALLOWED_FORMATS = ("PNG", "JPEG")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IGNORED_SUFFIXES = (".csv", ".txt", ".md", ".json")  # top-level notes in a zip (labels.csv, README)
MAX_FIELD_BYTES = 64 * 1024
MAX_PARTS = 1000
RATIO_CHECK_MIN_BYTES = 64 * 1024  # tiny members may compress extremely well without being bombs
LABEL_RE = re.compile(r"^[a-z0-9][a-z0-9 _.+-]{0,63}$")


def is_top_level_note(name: str) -> bool:
    """A file beside the label folders that is not a sample: notes (csv, txt, md, json) and the report
    figures ``cxrsynth generate`` writes there (``models.data.folders.SIDECAR_IMAGES``)."""
    return name.lower().endswith(IGNORED_SUFFIXES) or name in SIDECAR_IMAGES


# --------------------------------------------------------------------------------------------------
# Streaming multipart intake
# --------------------------------------------------------------------------------------------------
@dataclass
class SpooledFile:
    """One file part of the form, written to ``path``."""

    field: str
    filename: str
    path: Path
    size: int = 0


@dataclass
class SpooledForm:
    """The text fields and file parts of a multipart body."""

    fields: dict[str, str] = field(default_factory=dict)
    files: list[SpooledFile] = field(default_factory=list)


class _FormSink:
    """Callbacks of python-multipart's streaming parser: headers -> part kind, data -> file or field."""

    def __init__(self, workdir: Path, max_parts: int) -> None:
        self.workdir = workdir
        self.max_parts = max_parts
        self.form = SpooledForm()
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[str, bytes] = {}
        self._file: SpooledFile | None = None
        self._out: BinaryIO | None = None
        self._field_name: str | None = None
        self._field_value = bytearray()
        self._parts = 0

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self.on_part_begin, "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished, "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
        }

    def on_part_begin(self) -> None:
        self._headers = {}
        self._parts += 1
        if self._parts > self.max_parts:
            raise InvalidInput(f"at most {self.max_parts} parts per upload", slug="too-many-files")

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_field.decode("latin-1").lower()] = self._header_value
        self._header_field = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, opts = parse_options_header(self._headers.get("content-disposition", b"").decode("latin-1"))
        name = opts.get(b"name", b"").decode("utf-8", "replace")
        filename = opts.get(b"filename")
        if filename is not None:
            path = self.workdir / f"part-{self._parts:05d}"
            self._file = SpooledFile(name, filename.decode("utf-8", "replace"), path)
            self._out = path.open("wb")
        else:
            self._field_name = name
            self._field_value = bytearray()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._out is not None and self._file is not None:
            self._out.write(chunk)
            self._file.size += len(chunk)
        else:
            self._field_value += chunk
            if len(self._field_value) > MAX_FIELD_BYTES:
                raise InvalidInput(f"form field {self._field_name!r} is over {MAX_FIELD_BYTES} bytes")

    def on_part_end(self) -> None:
        if self._out is not None and self._file is not None:
            self._out.close()
            self.form.files.append(self._file)
            self._out, self._file = None, None
        elif self._field_name is not None:
            self.form.fields[self._field_name] = self._field_value.decode("utf-8", "replace")
            self._field_name = None

    def close(self) -> None:
        if self._out is not None:
            self._out.close()


async def spool_multipart(
    chunks: AsyncIterator[bytes], content_type: str | None, workdir: Path, max_bytes: int,
    max_parts: int = MAX_PARTS,
) -> SpooledForm:
    """Parse a ``multipart/form-data`` body chunk by chunk into ``workdir``.

    Raises 413 as soon as more than ``max_bytes`` arrived (the rest is never read), 415 for another
    content type and 422 for a malformed body.
    """
    ctype, opts = parse_options_header(content_type or "")
    boundary = opts.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise ProblemError("send the upload as multipart/form-data", status=415,
                           slug="unsupported-media-type", title="Unsupported media type")
    sink = _FormSink(workdir, max_parts)
    parser = MultipartParser(boundary, sink.callbacks())  # type: ignore[arg-type]
    received = 0
    try:
        async for chunk in chunks:
            received += len(chunk)
            if received > max_bytes:
                raise PayloadTooLarge(f"the upload is over the limit of {max_bytes} bytes", limit=max_bytes)
            # Parsing writes file parts to disk: off the event loop.
            await anyio.to_thread.run_sync(parser.write, chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise InvalidInput("the multipart body is malformed", slug="malformed-multipart") from exc
    finally:
        sink.close()
    return sink.form


# --------------------------------------------------------------------------------------------------
# Image checks
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PreparedImage:
    """An accepted image, converted to an 8-bit grey PNG at ``path``."""

    label: str
    name: str  # NAME.png, unique within its label
    path: Path
    sha256: str
    size: int
    source: str  # name in the upload, for messages
    width: int = 0  # pixels of the stored PNG (0 when unknown)
    height: int = 0


def normalise_label(raw: str, where: str) -> str:
    """Label folder name -> label (lower-cased like ``models.data.folders``); 422 when unusable."""
    label = raw.strip().lower()
    if not LABEL_RE.match(label):
        raise InvalidInput(f"{where}: label {raw!r} must be 1-64 characters of letters, digits, space, "
                           "'_', '.', '+' or '-' (starting with a letter or digit)", slug="invalid-label")
    return label


def open_checked_image(data: IO[bytes], max_pixels: int, where: str) -> Image.Image:
    """Open PNG/JPEG bytes after checking the type (sniffed, not the extension), the pixel count (before
    decoding anything) and the file's integrity; 422 otherwise. Returns the decoded image."""
    try:
        with Image.open(data, formats=ALLOWED_FORMATS) as probe:
            width, height = probe.size
            if width < 1 or height < 1 or width * height > max_pixels:
                raise InvalidInput(f"{where}: {width}x{height} pixels is over the limit of {max_pixels}",
                                   slug="image-too-large")
            probe.verify()
        data.seek(0)
        img = Image.open(data, formats=ALLOWED_FORMATS)
        img.load()
        return img
    except ProblemError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidInput(f"{where}: not a readable PNG or JPEG image", slug="not-an-image") from exc


def to_grey8(img: Image.Image) -> Image.Image:
    """8-bit grey: 16-bit images are scaled (not clipped), colour converted with ITU-R 601 luma."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        arr = np.asarray(img, dtype=np.uint16)
        return Image.fromarray((arr.astype(np.float32) * (255.0 / 65535.0) + 0.5).astype(np.uint8), "L")
    if img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) * (255.0 / (hi - lo))
        return Image.fromarray((scaled + 0.5).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert("L")


def _safe_stem(name: str) -> str:
    stem = PurePosixPath(name).stem
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:100]
    return cleaned or "image"


class _Namer:
    """Unique ``NAME.png`` per label (``a.jpg`` and ``a.png`` become ``a.png`` and ``a-1.png``)."""

    def __init__(self) -> None:
        self.used: dict[str, set[str]] = {}

    def __call__(self, label: str, source_name: str) -> str:
        used = self.used.setdefault(label, set())
        stem = _safe_stem(source_name)
        name, i = f"{stem}.png", 1
        while name.lower() in used:
            name, i = f"{stem}-{i}.png", i + 1
        used.add(name.lower())
        return name


@dataclass
class _Budget:
    max_images: int
    count: int = 0

    def take(self) -> None:
        self.count += 1
        if self.count > self.max_images:
            raise InvalidInput(f"at most {self.max_images} images per upload", slug="too-many-files")


def _write_png(img: Image.Image, label: str, name: str, outdir: Path, source: str) -> PreparedImage:
    folder = outdir / label
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    to_grey8(img).save(buf, format="PNG")
    data = buf.getvalue()
    path = folder / name
    path.write_bytes(data)
    return PreparedImage(label, name, path, hashlib.sha256(data).hexdigest(), len(data), source, *img.size)


def is_zip(path: Path) -> bool:
    """Zip by magic bytes (local file header or empty-archive end record), not by extension."""
    with path.open("rb") as f:
        head = f.read(4)
    return head in (b"PK\x03\x04", b"PK\x05\x06")


# --------------------------------------------------------------------------------------------------
# Zip checks
# --------------------------------------------------------------------------------------------------
def _unsafe_name(name: str) -> bool:
    if not name or name.startswith(("/", "\\")) or "\\" in name or "\x00" in name:
        return True
    if re.match(r"^[A-Za-z]:", name):
        return True
    return any(part in ("..", ".") for part in name.rstrip("/").split("/"))


def _ignorable(parts: tuple[str, ...]) -> bool:
    return parts[0] == "__MACOSX" or any(p.startswith(".") for p in parts)


def _check_zip_members(zf: zipfile.ZipFile, settings: Settings, where: str) -> list[zipfile.ZipInfo]:
    """Every member safe (names, types, sizes, ratios); returns the file members to read."""
    infos = zf.infolist()
    if len(infos) > settings.max_upload_files:
        raise InvalidInput(f"{where}: {len(infos)} members is over the limit of {settings.max_upload_files}",
                           slug="too-many-files")
    total = 0
    files = []
    for info in infos:
        name = info.filename
        if _unsafe_name(name):
            raise InvalidInput(f"{where}: unsafe member name {name!r} (absolute, '..' or backslash)",
                               slug="unsafe-path")
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise InvalidInput(f"{where}: member {name!r} is a symbolic link", slug="unsafe-path")
        if info.is_dir():
            continue
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # device, fifo, socket... (0: no type recorded)
            raise InvalidInput(f"{where}: member {name!r} is not a regular file", slug="unsafe-path")
        if info.flag_bits & 0x1:
            raise InvalidInput(f"{where}: member {name!r} is encrypted", slug="malformed-zip")
        total += info.file_size
        if total > settings.max_uncompressed_bytes:
            raise InvalidInput(f"{where}: uncompressed size is over the limit of "
                               f"{settings.max_uncompressed_bytes} bytes", slug="zip-bomb")
        if info.file_size > RATIO_CHECK_MIN_BYTES and (
            info.file_size > settings.max_compression_ratio * max(info.compress_size, 1)
        ):
            raise InvalidInput(f"{where}: member {name!r} compresses {info.file_size / max(info.compress_size, 1):.0f}"
                               f":1, over the limit of {settings.max_compression_ratio:.0f}:1", slug="zip-bomb")
        files.append(info)
    return files


def _zip_layout(files: list[zipfile.ZipInfo]) -> list[tuple[zipfile.ZipInfo, tuple[str, ...]]]:
    """(member, path parts) of the members that matter; a single wrapping folder is stripped."""
    kept = []
    for info in files:
        parts = tuple(p for p in info.filename.split("/") if p)
        if not parts or _ignorable(parts):
            continue
        kept.append((info, parts))
    firsts = {parts[0] for _, parts in kept}
    if len(firsts) == 1 and kept and all(len(parts) >= 3 for _, parts in kept):
        kept = [(info, parts[1:]) for info, parts in kept]
    return kept


def _member_cap(settings: Settings) -> int:
    # No PNG/JPEG within the pixel limit is bigger than 8 bytes a pixel (RGBA 16-bit, uncompressed).
    return min(settings.max_uncompressed_bytes, 8 * settings.max_image_pixels + (1 << 20))


def _prepare_zip(
    path: Path, source: str, settings: Settings, outdir: Path, namer: _Namer, budget: _Budget, label_field: str | None
) -> list[PreparedImage]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InvalidInput(f"{source}: not a readable zip file", slug="malformed-zip") from exc
    out: list[PreparedImage] = []
    cap = _member_cap(settings)
    with zf:
        members = _zip_layout(_check_zip_members(zf, settings, source))
        for info, parts in members:
            where = f"{source}:{info.filename}"
            if len(parts) == 1:
                if is_top_level_note(parts[0]):
                    continue
                if label_field is None:
                    raise InvalidInput(f"{where}: images must be in LABEL/ folders (or send a label field)",
                                       slug="bad-layout")
                label = label_field
            elif len(parts) == 2:
                label = normalise_label(parts[0], where)
            else:
                raise InvalidInput(f"{where}: expected LABEL/NAME.png, found {len(parts)} levels", slug="bad-layout")
            if info.file_size > cap:
                raise InvalidInput(f"{where}: {info.file_size} bytes is too big for one image", slug="image-too-large")
            budget.take()
            try:
                with zf.open(info) as member:
                    data = member.read(cap + 1)
            except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError) as exc:
                raise InvalidInput(f"{where}: corrupt zip member", slug="malformed-zip") from exc
            img = open_checked_image(io.BytesIO(data), settings.max_image_pixels, where)
            with img:
                out.append(_write_png(img, label, namer(label, parts[-1]), outdir, where))
    return out


def prepare_images(form: SpooledForm, settings: Settings, outdir: Path) -> list[PreparedImage]:
    """Validate every file part (zips of ``LABEL/*.png|jpg`` and loose images, which need the ``label``
    field) and write each accepted image as an 8-bit grey PNG under ``outdir/LABEL/``.

    Raises 422 for the first problem; the caller deletes ``outdir`` either way.
    """
    if not form.files:
        raise InvalidInput("no file in the upload: send a zip or images as multipart file parts",
                           slug="no-files")
    raw_label = form.fields.get("label")
    label_field = normalise_label(raw_label, "label field") if raw_label is not None else None
    namer, budget = _Namer(), _Budget(settings.max_upload_files)
    out: list[PreparedImage] = []
    for part in form.files:
        source = part.filename or part.field or "upload"
        if part.size == 0:
            raise InvalidInput(f"{source}: empty file", slug="not-an-image")
        if is_zip(part.path):
            out.extend(_prepare_zip(part.path, source, settings, outdir, namer, budget, label_field))
            continue
        if label_field is None:
            raise InvalidInput(f"{source}: a loose image needs the 'label' form field", slug="missing-label")
        budget.take()
        with part.path.open("rb") as f:
            img = open_checked_image(f, settings.max_image_pixels, source)
            with img:
                out.append(_write_png(img, label_field, namer(label_field, source), outdir, source))
    if not out:
        raise InvalidInput("the upload holds no images", slug="no-files")
    return out


def sniff_stored_image(data: bytes, max_pixels: int, where: str) -> None:
    """Check stored bytes are a PNG/JPEG within the pixel limit (used when registering a prefix)."""
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as probe:
            width, height = probe.size
            if width < 1 or height < 1 or width * height > max_pixels:
                raise InvalidInput(f"{where}: {width}x{height} pixels is over the limit of {max_pixels}",
                                   slug="image-too-large")
            probe.verify()
    except ProblemError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidInput(f"{where}: not a readable PNG or JPEG image", slug="not-an-image") from exc
