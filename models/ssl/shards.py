"""WebDataset shards for pretraining: where they live (a folder or S3), what each holds, and its samples.

A :class:`ShardSource` lists ``*.tar`` shards and opens each one as a byte stream: :class:`LocalShards`
(a folder of shards, or a WebDataset export with ``shards/`` and ``manifest.csv``) or :class:`S3Shards`
(``s3://bucket/prefix/`` streamed with the ``minio`` client's ``get_object``; nothing is copied to local
disk). :func:`index_shards` learns how many samples each shard holds (from the export's ``manifest.csv``
when there is one, else by walking the tar headers) and :func:`iter_samples` yields one shard's samples
as raw bytes through webdataset's own tar iterators.

Damage is never skipped: a truncated or corrupt shard, a sample with no image, or a shard holding a
different number of samples than indexed raises ``ValueError`` naming the shard.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

if TYPE_CHECKING:
    from minio import Minio

SHARD_SUFFIX = ".tar"
SHARDS_DIR = "shards"  # the export layout (models.release.writers.write_webdataset): shards/data-NNNNNN.tar
MANIFEST = "manifest.csv"
IMAGE_EXTS = ("png", "jpg", "jpeg")
BLOCK = 512  # tar block size


@dataclass(frozen=True)
class ShardCount:
    """How many samples one shard holds and their labels (``{}`` when labels were not read)."""

    samples: int
    labels: Counter[str] = field(default_factory=Counter)


class ShardSource(ABC):
    """Where WebDataset shards live: a sorted list of shard names and a byte stream for each.

    ``name`` is what a :class:`~models.ssl.data.DataSummary` and error messages call the whole set.
    ``cheap_count``: counting a shard's tar headers costs little (a local file is seeked over, a remote
    one would be downloaded), so it is done even when a manifest gives the counts.
    """

    name: str
    cheap_count: bool = False

    @abstractmethod
    def list_shards(self) -> list[str]:
        """Shard names relative to the source (sorted); ``ValueError`` when there are none."""

    @abstractmethod
    def open(self, shard: str) -> AbstractContextManager[IO[bytes]]:
        """A readable, forward-only byte stream of one shard."""

    @abstractmethod
    def open_manifest(self) -> AbstractContextManager[IO[bytes]] | None:
        """The export's ``manifest.csv`` beside the shards, or ``None`` when there is none."""

    @abstractmethod
    def where(self, shard: str) -> str:
        """The full location of a shard, for messages."""

    def count(self, shard: str, read_labels: bool) -> ShardCount:
        """Samples (and labels) of one shard, streaming it once; checks the tar ends where it should.

        ``tarfile`` directly rather than webdataset: webdataset has no way to count a shard, and its
        iterator hides the archive's logical end (``TarFile.offset``) that the damage check needs.
        """
        where = self.where(shard)
        tally = _Tally(where, read_labels)
        with self.open(shard) as raw:
            reader = _EndCheck(raw)
            try:
                with tarfile.open(fileobj=reader, mode="r|") as tf:
                    for member in tf:
                        tally.add(member, partial(_read_member, tf, member))
                    end = tf.offset
            except tarfile.TarError as exc:
                raise ValueError(f"corrupt or truncated shard {where}: {exc}") from exc
            reader.drain()
            _check_end(where, end, reader.size, reader.data_end)
        return tally.result()


def _read_member(tf: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tf.extractfile(member)
    return f.read() if f is not None else b""


class _Reader(io.RawIOBase):
    """A plain pass-through reader over any object with ``read(n)``.

    An urllib3 response reports itself closed once its body is consumed, which ``io.TextIOWrapper``
    takes as an error before it has read its buffer; this wrapper is closed only when closed.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        super().__init__()
        self.raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self.raw.read(len(buffer))
        buffer[: len(chunk)] = chunk
        self._seen(chunk)
        return len(chunk)

    def _seen(self, chunk: bytes) -> None:
        pass


class _EndCheck(_Reader):
    """A pass-through reader that remembers the stream's size and where its last non-zero byte is.

    Hand-written because ``tarfile`` (and so webdataset) stops without an error at a corrupt member
    header or at a shard cut on a member boundary: the shard just looks shorter. A well-formed tar
    has only zero blocks after its last member; comparing that position with the data seen tells.
    """

    def __init__(self, raw: IO[bytes]) -> None:
        super().__init__(raw)
        self.size = 0
        self.data_end = 0  # 1 + position of the last non-zero byte read

    def _seen(self, chunk: bytes) -> None:
        stripped = len(chunk.rstrip(b"\0"))
        if stripped:
            self.data_end = self.size + stripped
        self.size += len(chunk)

    def drain(self) -> None:
        """Read to the end of the stream (only the end-of-archive padding is left)."""
        while self.read(1 << 16):
            pass


def _check_end(where: str, end: int, size: int, data_end: int) -> None:
    """Raise unless only zero blocks (at least one) follow the last member, which ends at ``end``."""
    if data_end > end or size - end < BLOCK:
        raise ValueError(
            f"corrupt or truncated shard {where}: its members end at byte {end} of {size} "
            f"({'data follows' if data_end > end else 'no end-of-archive block'})"
        )


class _Tally:
    """Counts the samples of one shard as webdataset groups them (consecutive members sharing a key)."""

    def __init__(self, where: str, read_labels: bool) -> None:
        self.where, self.read_labels = where, read_labels
        self.samples = 0
        self.labels: Counter[str] = Counter()
        self._key: str | None = None
        self._suffixes: set[str] = set()
        self._label: str | None = None

    def add(self, member: tarfile.TarInfo, read: Callable[[], bytes]) -> None:
        """One tar member (skipped like ``tar_file_iterator`` does: non-files, ``__meta__``, no suffix)."""
        name = member.name
        if not member.isreg() or ("/" not in name and name.startswith("__") and name.endswith("__")):
            return
        key, suffix = base_plus_ext(name)
        if key is None:
            return
        if key != self._key:
            self._finish()
            self._key = key
        suffix = suffix.lower()
        self._suffixes.add(suffix)
        if self.read_labels and suffix in ("json", "cls"):
            label = self._label_of(suffix, read(), key)
            if label is not None and (suffix == "json" or self._label is None):  # json's label wins
                self._label = label

    def _label_of(self, suffix: str, data: bytes, key: str) -> str | None:
        try:
            if suffix == "cls":
                return data.decode().strip() or None
            obj = json.loads(data or b"{}")
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"sample {key!r} in shard {self.where} has an unreadable .{suffix}: {exc}") from exc
        label = obj.get("label") if isinstance(obj, dict) else None
        return None if label in (None, "") else str(label)

    def _finish(self) -> None:
        if self._key is None:
            return
        require_image(self._suffixes, self._key, self.where)
        self.samples += 1
        if self.read_labels:
            self.labels[self._label or "unlabelled"] += 1
        self._suffixes, self._label = set(), None

    def result(self) -> ShardCount:
        """The count once every member was added."""
        self._finish()
        self._key = None
        return ShardCount(self.samples, self.labels)


def require_image(keys: Any, key: str, where: str) -> str:
    """The image extension of a sample (``png``/``jpg``/``jpeg``); ``ValueError`` when it has none."""
    for ext in IMAGE_EXTS:
        if ext in keys:
            return ext
    found = ", ".join(sorted(k for k in keys if not str(k).startswith("__"))) or "nothing"
    raise ValueError(f"sample {key!r} in shard {where} has no image (.png/.jpg/.jpeg); it holds: {found}")


# --------------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------------
class LocalShards(ShardSource):
    """Shards in a folder: ``ROOT/*.tar``, or the export layout ``ROOT/shards/*.tar`` + ``ROOT/manifest.csv``."""

    cheap_count = True

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        if self.root.is_file():
            hint = " (an export archive? extract it, then pass the folder)" if self.root.suffix == ".tar" else ""
            raise ValueError(f"{self.root} is a file, not a folder of shards{hint}")
        if not self.root.is_dir():
            raise FileNotFoundError(f"shard folder not found: {self.root}")
        self.name = self.root.resolve().name

    def _shard_dir(self) -> Path:
        if not any(self.root.glob("*" + SHARD_SUFFIX)) and (self.root / SHARDS_DIR).is_dir():
            return self.root / SHARDS_DIR
        return self.root

    def list_shards(self) -> list[str]:
        """``NAME.tar`` or ``shards/NAME.tar``, sorted."""
        folder = self._shard_dir()
        names = sorted(p.relative_to(self.root).as_posix() for p in folder.glob("*" + SHARD_SUFFIX) if p.is_file())
        if not names:
            raise ValueError(f"no WebDataset shards (*{SHARD_SUFFIX}) in {folder}")
        return names

    def open(self, shard: str) -> AbstractContextManager[IO[bytes]]:
        """The shard file."""
        return (self.root / shard).open("rb")

    def open_manifest(self) -> AbstractContextManager[IO[bytes]] | None:
        """``ROOT/manifest.csv`` when present."""
        path = self.root / MANIFEST
        return path.open("rb") if path.is_file() else None

    def where(self, shard: str) -> str:
        """The shard's path."""
        return str(self.root / shard)

    def count(self, shard: str, read_labels: bool) -> ShardCount:
        """Walk the tar headers (image bytes are seeked over, never read)."""
        path = self.root / shard
        tally = _Tally(str(path), read_labels)
        try:
            with tarfile.open(path, mode="r:") as tf:
                for member in tf:
                    tally.add(member, partial(_read_member, tf, member))
                end = tf.offset
        except tarfile.TarError as exc:
            raise ValueError(f"corrupt or truncated shard {path}: {exc}") from exc
        size = path.stat().st_size
        start = min(end, size)
        with path.open("rb") as f:
            f.seek(start)
            tail = f.read()  # only the end-of-archive padding in a sound shard
        _check_end(str(path), end, size, start + len(tail.rstrip(b"\0")))
        return tally.result()


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> ``(bucket, "prefix/")`` (the prefix is a folder: it ends with ``/``)."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url!r}")
    prefix = prefix.strip("/")
    return bucket, prefix + "/" if prefix else ""


class S3Shards(ShardSource):
    """Shards under ``s3://bucket/prefix/`` (or ``prefix/shards/``), streamed with ``minio``'s ``get_object``.

    Pass a ``minio.Minio`` client, or the endpoint (``host:port``) and keys to build one; a plain
    ``s3://`` string given to :func:`~models.ssl.data.pretraining_dataset` uses :meth:`from_env`.
    Connection pools are never shared across processes: a DataLoader worker gets its own connections.
    """

    def __init__(self, url: str, client: Minio | None = None, *, endpoint: str | None = None,
                 access_key: str | None = None, secret_key: str | None = None, secure: bool = True,
                 region: str | None = None) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self.name = f"s3://{self.bucket}/{self.prefix}"
        if client is None and endpoint is None:
            raise ValueError("S3Shards needs a minio client or an endpoint")
        self._connect: dict[str, Any] | None = None
        if client is None:
            self._connect = {"endpoint": endpoint, "access_key": access_key, "secret_key": secret_key,
                             "secure": secure, "region": region}
        self._client = client
        self._pid = os.getpid()

    @classmethod
    def from_env(cls, url: str) -> S3Shards:
        """Endpoint and keys from the standard AWS variables: ``AWS_ENDPOINT_URL`` (default AWS S3),
        ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION`` (anonymous without keys)."""
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "https://s3.amazonaws.com")
        secure = not endpoint.startswith("http://")
        host = endpoint.split("://", 1)[-1].rstrip("/")
        return cls(url, endpoint=host, access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
                   secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"), secure=secure,
                   region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"))

    def client(self) -> Minio:
        """This process's client (a forked DataLoader worker drops the connections it inherited)."""
        if self._client is None or os.getpid() != self._pid:
            if self._connect is not None:
                from minio import Minio

                self._client = Minio(**self._connect)
            elif self._client is not None:
                # Minio has no public way to reset its urllib3 pool; idle keep-alive sockets inherited
                # through fork would otherwise be shared by every worker (interleaved responses).
                self._client._http.clear()
            self._pid = os.getpid()
        assert self._client is not None
        return self._client

    def __getstate__(self) -> dict[str, Any]:
        if self._connect is None:
            raise ValueError("an S3Shards made from a minio client cannot go to a spawned process; "
                             "build it with endpoint/access_key/secret_key instead")
        return {**self.__dict__, "_client": None}

    def _key(self, shard: str) -> str:
        return self.prefix + shard

    def list_shards(self) -> list[str]:
        """``NAME.tar`` right under the prefix, else ``shards/NAME.tar``, sorted."""
        from minio.error import S3Error

        try:
            names = [o.object_name[len(self.prefix):] for o in
                     self.client().list_objects(self.bucket, prefix=self.prefix, recursive=True)
                     if o.object_name and o.object_name.endswith(SHARD_SUFFIX)]
        except S3Error as exc:
            raise ValueError(f"cannot list {self.name}: {exc.code} {exc.message}") from exc
        top = sorted(n for n in names if "/" not in n)
        nested = sorted(n for n in names if n.startswith(SHARDS_DIR + "/") and n.count("/") == 1)
        if not (top or nested):
            raise ValueError(f"no WebDataset shards (*{SHARD_SUFFIX}) under {self.name}")
        return top or nested

    @contextmanager
    def _stream(self, key: str) -> Iterator[IO[bytes]]:
        response = self.client().get_object(self.bucket, key)
        try:
            yield response  # type: ignore[misc]  # urllib3's BaseHTTPResponse is a readable stream
        finally:
            response.close()
            response.release_conn()

    def open(self, shard: str) -> AbstractContextManager[IO[bytes]]:
        """A streaming ``get_object`` (read as it is consumed, never stored)."""
        return self._stream(self._key(shard))

    def open_manifest(self) -> AbstractContextManager[IO[bytes]] | None:
        """``prefix/manifest.csv`` when the object exists."""
        from minio.error import S3Error

        try:
            self.client().stat_object(self.bucket, self.prefix + MANIFEST)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
                return None
            raise ValueError(f"cannot read {self.name}{MANIFEST}: {exc.code} {exc.message}") from exc
        return self._stream(self.prefix + MANIFEST)

    def where(self, shard: str) -> str:
        """``s3://bucket/prefix/shard``."""
        return self.name + shard


# --------------------------------------------------------------------------------------------------
# index and samples
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardIndex:
    """The shards of a source in a fixed order, the samples each holds, and the label counts."""

    source: ShardSource
    shards: tuple[str, ...]
    counts: tuple[int, ...]
    labels: dict[str, int]
    counted_from: str  # "manifest", "tar headers", or "manifest + tar headers"

    @property
    def num_samples(self) -> int:
        """Samples in all shards."""
        return sum(self.counts)


def _manifest_counts(source: ShardSource, shards: list[str]) -> tuple[list[int], Counter[str]] | None:
    """Per-shard counts and labels from the export's ``manifest.csv`` (``None`` without a ``shard`` column)."""
    opened = source.open_manifest()
    if opened is None:
        return None
    per_shard: Counter[str] = Counter()
    labels: Counter[str] = Counter()
    with opened as raw, io.TextIOWrapper(io.BufferedReader(_Reader(raw)), encoding="utf-8", newline="") as text:
        reader = csv.DictReader(text)
        if "shard" not in (reader.fieldnames or []):
            return None
        for row in reader:
            per_shard[PurePosixPath(row["shard"] or "").name] += 1
            labels[row.get("label") or "unlabelled"] += 1
    names = {PurePosixPath(s).name: s for s in shards}
    unknown = sorted(set(per_shard) - set(names))
    missing = sorted(set(names) - set(per_shard))
    if unknown or missing:
        raise ValueError(
            f"{MANIFEST} of {source.name} does not match its shards: "
            + "; ".join(p for p in (f"listed but absent: {unknown[:5]}" if unknown else "",
                                    f"present but not listed: {missing[:5]}" if missing else "") if p)
        )
    return [per_shard[PurePosixPath(s).name] for s in shards], labels


def index_shards(source: ShardSource) -> ShardIndex:
    """List and count the shards of ``source``; ``ValueError`` for no shards, no samples, or damage.

    With a manifest, counts come from it (for a cheap local source every shard is also walked and must
    agree, so a damaged shard fails here rather than mid-run); without one, every shard is counted.
    """
    shards = source.list_shards()
    manifest = _manifest_counts(source, shards)
    if manifest is not None and not source.cheap_count:
        counts, labels = manifest
        how = "manifest"
    else:
        tallies = [source.count(s, read_labels=manifest is None) for s in shards]
        counts = [t.samples for t in tallies]
        labels = sum((t.labels for t in tallies), Counter())
        how = "tar headers"
        if manifest is not None:
            for shard, n, m in zip(shards, counts, manifest[0], strict=True):
                if n != m:
                    raise ValueError(f"shard {source.where(shard)} holds {n} samples, {MANIFEST} says {m}: "
                                     "corrupt, truncated or rewritten")
            labels, how = manifest[1], "manifest + tar headers"
    if sum(counts) == 0:
        raise ValueError(f"the shards of {source.name} hold no samples")
    return ShardIndex(source, tuple(shards), tuple(counts), dict(sorted(labels.items())), how)


def iter_samples(source: ShardSource, shard: str, expected: int) -> Iterator[dict[str, Any]]:
    """The samples of one shard (webdataset dicts of raw bytes, ``__key__`` + one entry per extension).

    Raises ``ValueError`` naming the shard when it cannot be read, a sample has no image, or it holds
    another number of samples than ``expected`` (what the index counted).
    """
    where = source.where(shard)
    n = 0
    with source.open(shard) as stream:
        samples = group_by_keys(tar_file_expander([{"url": where, "stream": stream}]))
        while True:
            try:
                sample = next(samples)
            except StopIteration:
                break
            except (tarfile.TarError, ValueError, OSError) as exc:  # webdataset appends (stream, url) to args
                reason = exc.args[0] if exc.args else exc
                raise ValueError(f"corrupt or truncated shard {where}: {reason}") from exc
            require_image(sample, sample["__key__"], where)
            n += 1
            yield sample
    if n != expected:
        raise ValueError(f"shard {where} holds {n} samples, {expected} were indexed: corrupt, truncated or "
                         "rewritten since")
