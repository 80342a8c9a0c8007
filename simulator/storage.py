"""Where datasets live: a local folder, or any pyarrow filesystem URI (`s3://bucket/prefix`, `gs://…`, `hdfs://…`).

`Store.open(output)` gives one object the driver writes through, whatever is behind it. Paths inside a store are
strings with `/` separators, relative to nothing: `store.path("1xS_1xUT", "run=0")` joins them under the root.

The commit protocol uses no directory rename, because object stores have none:
    a record part      one write of the whole object (local: `<name>.tmp`, then a rename)
    a checkpoint       state-<iteration>.pt first, then checkpoint.json naming it, written last in one object
    a finished run     its files copied from staging into the dataset, then `run=<k>/_SUCCESS` written last;
                       a local folder is renamed into place instead (atomic), with the same `_SUCCESS` inside
A run counts as done when its `_SUCCESS` is there (a local run folder without one is an older dataset: done too,
since a rename put it there whole). Re-copying a run after a crash overwrites the same names with the same bytes.
`_SUCCESS` lists every file of the run with its size and SHA-256 (`digest`); `verify_run` checks a run against it.
Datasets written before the listing have none and count as whole.

One primitive is atomic on every store the dataset lock uses (simulator/lock.py), `create_exclusive`:
    local / shared POSIX folder   link(2) of a fully written temporary file: fails if the name exists (NFS too)
    S3                            PutObject with `If-None-Match: *` through boto3 (pyarrow exposes no conditional
                                  write): S3 answers 412 to every writer but the first
    any other pyarrow filesystem  exists-then-write: not atomic (the lock warns that it is advisory there)

URIs take pyarrow's query options, e.g. `s3://bucket/results?endpoint_override=host:9000&scheme=http&region=…`
(credentials from the usual AWS environment variables, or `s3://key:secret@bucket/…`). S3 gets a 5 s connect and
30 s request timeout and 3 attempts, so an endpoint that does not answer fails in seconds, not minutes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from simulator.errors import ConfigError

log = logging.getLogger("moralsim.storage")

SUCCESS = "_SUCCESS"
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+://)[^/@?#\s]+@")
S3_TIMEOUTS = {"connect_timeout": 5.0, "request_timeout": 30.0}
S3_ATTEMPTS = 3


def is_uri(output: str | os.PathLike[str]) -> bool:
    """Whether output names a filesystem by URI (scheme://…) rather than a local path."""
    return bool(_URI.match(os.fspath(output)))


def redact(text: str) -> str:
    """text with the credentials of any URI in it (scheme://key:secret@…) replaced by ***, for messages and logs."""
    return _USERINFO.sub(r"\1***@", text)


def _with_s3_timeouts(fs: pafs.FileSystem) -> pafs.FileSystem:
    """An S3 filesystem with bounded timeouts and retries (pyarrow's URIs cannot set them; its defaults retry for
    minutes against an endpoint that does not answer). Every other option of the URI is kept."""
    if not isinstance(fs, pafs.S3FileSystem):
        return fs
    _, (options,) = fs.__reduce__()
    options = dict(options)
    for key, seconds in S3_TIMEOUTS.items():
        if options.get(key, -1) < 0:
            options[key] = seconds
    if not (options.get("proxy_options") or {}).get("host"):
        options.pop("proxy_options", None)
    return pafs.S3FileSystem(**options, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS))


@dataclass(frozen=True)
class Store:
    """A root inside a pyarrow filesystem. Local folders use pyarrow's LocalFileSystem with the same calls."""

    uri: str  # as the user gave it (messages, identity)
    fs: pafs.FileSystem
    root: str  # the root's path inside fs, without a trailing slash

    @classmethod
    def open(cls, output: str | os.PathLike[str]) -> Store:
        return _open(os.fspath(output))

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *(p.strip("/") for p in parts if p)])

    def display(self, path: str) -> str:
        """path as the user would write it: a local path, or the URI's scheme and bucket."""
        if self.local:
            return path
        scheme = urlsplit(self.uri).scheme
        return f"{scheme}://{path}"

    def local_path(self, path: str) -> Path:
        if not self.local:
            raise ConfigError(f"{self.display(path)} is not on a local filesystem")
        return Path(path)

    # -- queries ----------------------------------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        return bool(self.fs.get_file_info(path).type != pafs.FileType.NotFound)

    def is_file(self, path: str) -> bool:
        return bool(self.fs.get_file_info(path).type == pafs.FileType.File)

    def is_dir(self, path: str) -> bool:
        return bool(self.fs.get_file_info(path).type == pafs.FileType.Directory)

    def names(self, path: str) -> list[str]:
        """Names directly inside the folder path (files and folders), sorted; [] when there is none."""
        infos = self.fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        return sorted(i.base_name for i in infos)

    def files(self, path: str) -> Iterator[tuple[str, int]]:
        """(path relative to `path`, size) of every file below the folder path."""
        infos = self.fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        for i in infos:
            if i.type == pafs.FileType.File:
                yield i.path[len(path.rstrip("/")) + 1:], i.size

    # -- writes -----------------------------------------------------------------------------------------------
    def makedirs(self, path: str) -> None:
        self.fs.create_dir(path, recursive=True)

    def delete_dir(self, path: str) -> None:
        if self.exists(path):
            self.fs.delete_dir(path)

    def delete_file(self, path: str) -> None:
        if self.exists(path):
            self.fs.delete_file(path)

    def write_bytes(self, path: str, data: bytes) -> None:
        """The whole object at once: never a half file under its name (local: write a .tmp, then rename)."""
        if self.local:
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            return
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return bytes(f.read())

    def write_json(self, path: str, doc: Any, **kwargs: Any) -> None:
        self.write_bytes(path, json.dumps(doc, **kwargs).encode())

    def read_json(self, path: str) -> Any:
        return json.loads(self.read_bytes(path))

    def write_table(self, table: pa.Table, path: str, compression: str = "zstd") -> None:
        if self.local:
            tmp = path + ".tmp"
            pq.write_table(table, tmp, compression=compression)
            os.replace(tmp, path)
        else:
            pq.write_table(table, path, compression=compression, filesystem=self.fs)

    def num_rows(self, path: str) -> int:
        with self.fs.open_input_file(path) as f:
            return int(pq.read_metadata(f).num_rows)

    def save_torch(self, obj: Any, path: str) -> int:
        """torch.save streamed into one object (a local .tmp renamed into place); returns its size in bytes."""
        import torch

        if self.local:
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            return os.path.getsize(path)
        with self.fs.open_output_stream(path) as out:
            torch.save(obj, out)
        return int(self.fs.get_file_info(path).size)

    def load_torch(self, path: str) -> Any:
        import torch

        if self.local:
            with open(path, "rb") as f:
                return torch.load(f, weights_only=False)
        return torch.load(io.BytesIO(self.read_bytes(path)), weights_only=False)  # torch.load needs to seek

    def upload_dir(self, local: Path, path: str) -> None:
        """Copy a local folder's files below path (LLM adapters saved by peft into a scratch folder)."""
        pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    def commit_dir(self, src: str, dst: str, success: dict[str, Any]) -> None:
        """Move the finished folder src to dst with `_SUCCESS` (the commit) written last; see the module doc."""
        if self.local:
            self.write_json(f"{src}/{SUCCESS}", success)
            Path(dst).parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)  # the run appears in the dataset whole, or not at all
            return
        self.delete_dir(dst)  # an uncommitted copy from an attempt that crashed half way
        for rel, _ in sorted(self.files(src)):
            self.fs.copy_file(f"{src}/{rel}", f"{dst}/{rel}")
        self.write_json(f"{dst}/{SUCCESS}", success)
        self.fs.delete_dir(src)

    def committed(self, path: str) -> bool:
        """Whether the run folder path is whole (see the module doc)."""
        if self.local:
            return Path(path).is_dir()
        return self.is_file(f"{path}/{SUCCESS}")

    def copy_file(self, src: str, dst: str) -> None:
        """dst gets src's bytes. Local: a hard link where the folder allows it (files here are never rewritten in
        place, only replaced by a rename, so the link stays a snapshot), else a copy renamed into place."""
        if self.local:
            Path(dst).parent.mkdir(parents=True, exist_ok=True)
            self.delete_file(dst)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst + ".tmp")
                os.replace(dst + ".tmp", dst)
            return
        self.fs.copy_file(src, dst)

    def move_dir(self, src: str, dst: str) -> None:
        """Move the folder src to dst. Local: one rename. Object store: copy everything, then delete src's
        `_SUCCESS` first, so src stops counting as a run before any of its files go."""
        if self.local:
            Path(dst).parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            return
        for rel, _ in sorted(self.files(src)):
            self.fs.copy_file(f"{src}/{rel}", f"{dst}/{rel}")
        self.delete_file(f"{src}/{SUCCESS}")
        self.fs.delete_dir(src)

    def sha256(self, path: str) -> str:
        h = hashlib.sha256()
        with self.fs.open_input_stream(path) as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        return h.hexdigest()

    def digest(self, path: str) -> dict[str, dict[str, Any]]:
        """{relative path: {"size", "sha256"}} of every file below the folder path (`_SUCCESS` aside), read back
        from the store: what `_SUCCESS` lists."""
        return {rel: {"size": size, "sha256": self.sha256(f"{path}/{rel}")}
                for rel, size in sorted(self.files(path)) if rel != SUCCESS}

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Write the object path only if nothing is there; whether this call created it. Atomic locally and on S3
        (see the module doc). A lost reply can make a winner read False: callers read the object back."""
        if self.local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{path}.{os.getpid()}-{os.urandom(4).hex()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        if isinstance(self.fs, pafs.S3FileSystem):
            from botocore.exceptions import ClientError

            bucket, _, key = path.partition("/")
            try:
                _s3_client(self.uri).put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                return True
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                    return False
                raise OSError(f"cannot create {self.display(path)}: {e}") from None
        if self.exists(path):
            return False
        self.write_bytes(path, data)
        return True

    @property
    def atomic_create(self) -> bool:
        """Whether create_exclusive is atomic on this store."""
        return self.local or isinstance(self.fs, pafs.S3FileSystem)


def verify_run(store: Store, path: str) -> list[str] | None:
    """What is wrong with the committed run folder path against the listing in its `_SUCCESS`: [] when every listed
    file is there with its size and SHA-256 and no unlisted part is; None when there is no listing to check (a run
    written before `_SUCCESS` listed hashes, or an older local run without `_SUCCESS`), which counts as whole."""
    marker = f"{path}/{SUCCESS}"
    if not store.is_file(marker):
        return None
    try:
        listed = store.read_json(marker).get("files")
    except (OSError, ValueError, AttributeError) as e:
        return [f"{SUCCESS}: unreadable ({e})"]
    if not isinstance(listed, dict):
        return None
    problems = []
    present = dict(store.files(path))
    for rel, want in sorted(listed.items()):
        if rel not in present:
            problems.append(f"{rel}: missing")
        elif present[rel] != want.get("size"):
            problems.append(f"{rel}: {present[rel]} bytes, listed {want.get('size')}")
        elif store.sha256(f"{path}/{rel}") != want.get("sha256"):
            problems.append(f"{rel}: SHA-256 differs")
    problems += [f"{rel}: not listed in {SUCCESS}" for rel in sorted(present)
                 if rel not in listed and rel.endswith(".parquet")]  # a reader would take it as records
    return problems


@lru_cache(maxsize=8)
def _s3_client(uri: str) -> Any:
    """A boto3 client for the S3 store of uri, with the URI's endpoint, region and credentials (or the usual AWS
    chain), and the same bounded timeouts and retries as the pyarrow filesystem."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ConfigError(f"--output {redact(uri)!r}: the dataset lock on S3 is a conditional write, which pyarrow "
                          "cannot make; it needs boto3 (pip install 'moralsim[s3]')") from None
    fs = Store.open(uri).fs
    _, (options,) = fs.__reduce__()
    endpoint = options.get("endpoint_override") or None
    session = boto3.session.Session(
        aws_access_key_id=options.get("access_key") or None, aws_secret_access_key=options.get("secret_key") or None,
        aws_session_token=options.get("session_token") or None, region_name=options.get("region") or None)
    config = Config(connect_timeout=S3_TIMEOUTS["connect_timeout"], read_timeout=S3_TIMEOUTS["request_timeout"],
                    retries={"max_attempts": S3_ATTEMPTS, "mode": "standard"})
    return session.client("s3", endpoint_url=f"{options.get('scheme', 'https')}://{endpoint}" if endpoint else None,
                          config=config)


@lru_cache(maxsize=32)
def _open(output: str) -> Store:
    if not is_uri(output):
        root = os.path.abspath(os.path.expanduser(output))
        return Store(output, pafs.LocalFileSystem(), root)
    try:
        fs, root = pafs.FileSystem.from_uri(output)
        fs = _with_s3_timeouts(fs)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError, OSError) as e:
        raise ConfigError(
            f"cannot open --output {redact(output)!r}: {e}. Give a local folder, or a pyarrow filesystem URI such as "
            "s3://bucket/prefix (options as a query: ?endpoint_override=host:port&scheme=http)"
        ) from None
    if isinstance(fs, pafs.LocalFileSystem):  # file:///abs/path
        return Store(output, fs, root)
    return Store(output, fs, root.rstrip("/"))


def check_writable(output: str | os.PathLike[str]) -> Store:
    """Create the output root and write and delete a probe in it; ConfigError naming the place and the reason if not."""
    import uuid

    store = Store.open(output)
    where = redact(os.fspath(output))
    if store.local:
        path = Path(store.root)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"cannot write the output folder {where!r}: it is a file, not a folder")
    probe = store.path(f".moralsim-write-check-{uuid.uuid4().hex}")
    try:
        store.makedirs(store.root)
        store.write_bytes(probe, b"probe")
        store.delete_file(probe)
    except OSError as e:
        if e.strerror:
            detail = e.strerror + (f" ({e.filename})" if e.filename and str(e.filename) != store.root else "")
        else:  # pyarrow's errors carry their text only
            detail = str(e).splitlines()[0]
        kind = "folder" if store.local else "location"
        raise ConfigError(f"cannot write the output {kind} {where!r}: {detail}") from None
    return store
