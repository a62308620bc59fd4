"""Upload intake without services: streaming multipart parsing, zip safety checks, image sniffing and
normalisation to 8-bit grey PNG."""

from __future__ import annotations

import io
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import numpy as np
import pytest
from PIL import Image

from app.core.config import Settings
from app.core.problems import InvalidInput, PayloadTooLarge, ProblemError
from app.services.uploads import SpooledFile, SpooledForm, prepare_images, spool_multipart, to_grey8


def _settings(tmp_path: Path, **kw: object) -> Settings:
    values: dict[str, object] = {"max_upload_files": 10, "max_uncompressed_bytes": 1_000_000,
                                 "max_image_pixels": 256 * 256, "max_compression_ratio": 20.0}
    values.update(kw)
    return Settings(_env_file=None, data_dir=tmp_path / "d", **values)  # type: ignore[call-arg, arg-type]


def _png(size: tuple[int, int] = (8, 8), mode: str = "L") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()


def _form(tmp_path: Path, files: dict[str, bytes], **fields: str) -> SpooledForm:
    form = SpooledForm(fields=dict(fields))
    for i, (name, data) in enumerate(files.items()):
        path = tmp_path / f"part{i}"
        path.write_bytes(data)
        form.files.append(SpooledFile("file", name, path, len(data)))
    return form


def _zip(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _slug(exc: pytest.ExceptionInfo[ProblemError]) -> str:
    return exc.value.slug


def test_image_folder_zip_with_wrapper_and_notes(tmp_path: Path) -> None:
    data = _zip({"set/NORMAL/a.png": _png(), "set/PNEUMONIA/b.png": _png(), "set/PNEUMONIA/b.jpg": _png(),
                 "__MACOSX/set/._a.png": b"x", "set/NORMAL/.hidden.png": b"x"})
    images = prepare_images(_form(tmp_path, {"set.zip": data}), _settings(tmp_path), tmp_path / "out")
    assert sorted((i.label, i.name) for i in images) == [("normal", "a.png"), ("pneumonia", "b-1.png"),
                                                         ("pneumonia", "b.png")]
    for img in images:
        assert img.path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and len(img.sha256) == 64


def test_a_zipped_generate_folder_uploads_as_is(tmp_path: Path) -> None:
    """``cxrsynth generate --out D`` writes a report figure and notes beside the label folders."""
    data = _zip({"normal/a.png": _png(), "pneumonia/b.png": _png(), "privacy_report.png": _png(),
                 "privacy_report.json": b"{}", "manifest.csv": b"file", "card.json": b"{}"})
    images = prepare_images(_form(tmp_path, {"out.zip": data}), _settings(tmp_path), tmp_path / "out")
    assert sorted((i.label, i.name) for i in images) == [("normal", "a.png"), ("pneumonia", "b.png")]


@pytest.mark.parametrize(("members", "slug"), [
    ({"../x.png": b""}, "unsafe-path"),
    ({"a/../../x.png": b""}, "unsafe-path"),
    ({"/abs/x.png": b""}, "unsafe-path"),
    ({"D:/x.png": b""}, "unsafe-path"),
    ({"a\\x.png": b""}, "unsafe-path"),
    ({"a/./x.png": b""}, "unsafe-path"),
    ({"normal/x.png": b"\0" * 200_000}, "zip-bomb"),
    ({f"normal/{i}.png": b"" for i in range(11)}, "too-many-files"),
    ({"normal/x.png": b"GIF89a..."}, "not-an-image"),
    ({"a/b/c/x.png": _png()}, "bad-layout"),
    ({"x.png": _png()}, "bad-layout"),
    ({"No Pe!/x.png": _png()}, "invalid-label"),
    ({"notes.txt": b"hello"}, "no-files"),
])
def test_zip_rejections(tmp_path: Path, members: dict[str, bytes], slug: str) -> None:
    with pytest.raises(InvalidInput) as exc:
        prepare_images(_form(tmp_path, {"x.zip": _zip(members)}), _settings(tmp_path), tmp_path / "out")
    assert _slug(exc) == slug


def test_zip_total_size_and_special_members(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    big = _zip({f"n/{i}.png": rng.bytes(300_000) for i in range(4)}, zipfile.ZIP_STORED)
    with pytest.raises(InvalidInput) as exc:
        prepare_images(_form(tmp_path, {"x.zip": big}), _settings(tmp_path), tmp_path / "o")
    assert _slug(exc) == "zip-bomb"
    for mode, slug in [(0o120777, "unsafe-path"), (0o010644, "unsafe-path")]:  # symlink, fifo
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            info = zipfile.ZipInfo("normal/x.png")
            info.external_attr = mode << 16
            zf.writestr(info, b"target")
        with pytest.raises(InvalidInput) as exc:
            prepare_images(_form(tmp_path, {"x.zip": buf.getvalue()}), _settings(tmp_path), tmp_path / "o")
        assert _slug(exc) == slug
    # An "encrypted" flag is refused before any decryption is attempted.
    raw = bytearray(_zip({"normal/x.png": _png()}))
    raw[6] |= 0x1  # local header flag
    cd = raw.rfind(b"PK\x01\x02")
    raw[cd + 8] |= 0x1  # central directory flag
    with pytest.raises(InvalidInput) as exc:
        prepare_images(_form(tmp_path, {"x.zip": bytes(raw)}), _settings(tmp_path), tmp_path / "o")
    assert _slug(exc) == "malformed-zip"


def test_loose_images_and_pixel_limit(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    with pytest.raises(InvalidInput) as exc:
        prepare_images(_form(tmp_path, {"a.png": _png()}), s, tmp_path / "o")
    assert _slug(exc) == "missing-label"
    images = prepare_images(_form(tmp_path, {"a.png": _png(), "scan 1.png": _png()}, label="Normal"), s,
                            tmp_path / "o")
    assert [(i.label, i.name) for i in images] == [("normal", "a.png"), ("normal", "scan_1.png")]
    with pytest.raises(InvalidInput) as exc:
        prepare_images(_form(tmp_path, {"a.png": _png((300, 300))}, label="n"), s, tmp_path / "o2")
    assert _slug(exc) == "image-too-large"
    for data in (b"%PDF-1.7", _png()[:30], b"\x89PNG\r\n\x1a\n" + b"\0" * 40):
        with pytest.raises(InvalidInput) as exc:
            prepare_images(_form(tmp_path, {"a.png": data}, label="n"), s, tmp_path / "o3")
        assert _slug(exc) == "not-an-image"


def test_to_grey8_scales_and_flattens() -> None:
    deep = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.uint16))
    assert np.asarray(to_grey8(deep)).tolist() == [[0, 128, 255]]
    rgba = Image.new("RGBA", (2, 1), (255, 255, 255, 0))
    assert np.asarray(to_grey8(rgba)).tolist() == [[0, 0]]  # transparent -> black background
    assert to_grey8(Image.new("RGB", (2, 2), (255, 0, 0))).mode == "L"


async def _chunks(parts: list[bytes]) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


def _multipart(boundary: str = "XyZ") -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"label\"\r\n\r\nnormal\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + _png() + f"\r\n--{boundary}--\r\n".encode()


def test_spool_multipart(tmp_path: Path) -> None:
    body = _multipart()
    pieces = [body[i:i + 7] for i in range(0, len(body), 7)]  # split anywhere, even inside headers

    async def run() -> SpooledForm:
        return await spool_multipart(_chunks(pieces), "multipart/form-data; boundary=XyZ", tmp_path, 10_000)

    form = anyio.run(run)
    assert form.fields == {"label": "normal"}
    assert [(f.field, f.filename, f.size) for f in form.files] == [("file", "a.png", len(_png()))]
    assert form.files[0].path.read_bytes() == _png()


def test_spool_multipart_limits(tmp_path: Path) -> None:
    body = _multipart()

    async def too_big() -> None:
        await spool_multipart(_chunks([body[:50], body[50:]]), "multipart/form-data; boundary=XyZ", tmp_path, 60)

    with pytest.raises(PayloadTooLarge):
        anyio.run(too_big)

    async def wrong_type() -> None:
        await spool_multipart(_chunks([b"{}"]), "application/json", tmp_path, 100)

    with pytest.raises(ProblemError) as exc:
        anyio.run(wrong_type)
    assert exc.value.status == 415

    async def garbage() -> None:
        await spool_multipart(_chunks([b"no boundary here at all\r\n"]), "multipart/form-data; boundary=XyZ",
                              tmp_path, 1000)

    with pytest.raises(InvalidInput):
        anyio.run(garbage)
