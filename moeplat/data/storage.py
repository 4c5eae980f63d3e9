"""Local paths and object storage (`s3://`) behind one API: fsspec, with s3fs for S3.

Why fsspec/s3fs rather than Lightning's litdata: the same calls read a local directory and a
bucket, `datasets.load_dataset` reads `data_files: s3://...` through the same fsspec filesystems,
and a prepared corpus stays one format (plain shard files) instead of gaining litdata's second
one. Credentials and endpoint come from the environment as botocore reads them
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL` or `AWS_ENDPOINT_URL_S3` for
MinIO, ...), so nothing secret is written into a spec.

Shards are not streamed from S3 at training time: a prepared directory on S3 is downloaded once
into a local cache keyed by its fingerprint (atomically: a half-downloaded copy is never used),
then read through np.memmap like a local one.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

log = logging.getLogger(__name__)

# A bucket that does not answer fails within seconds, not after botocore's minutes of retries.
_S3_CONFIG = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 2, "mode": "standard"}}


class StorageError(RuntimeError):
    """Object storage could not be reached or read; the message says which URL and what to check."""


def is_remote(path: str | os.PathLike) -> bool:
    """True for URLs fsspec reads from elsewhere (s3://, gs://, ...), False for local paths and file://."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for `url`; S3 with short timeouts and the environment's
    credentials and endpoint."""
    import fsspec

    protocol = url.split("://", 1)[0] if "://" in url else "file"
    options = {}
    if protocol in ("s3", "s3a"):
        options = {"config_kwargs": _S3_CONFIG}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:  # botocore reads these too; passed explicitly for older stacks that do not
            options["endpoint_url"] = endpoint
    try:
        return fsspec.core.url_to_fs(url, **options)
    except ImportError as e:  # pragma: no cover - s3fs is a locked dependency
        raise StorageError(f"cannot read {url}: {e}") from None


def _describe(url: str, err: Exception) -> str:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS's default"
    return (
        f"cannot read {url} ({type(err).__name__}: {err}); check the URL, that the bucket exists, "
        f"the endpoint ({endpoint}; set AWS_ENDPOINT_URL for MinIO) and the credentials "
        "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
    )


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise
    except Exception as e:  # botocore/aiohttp errors have no common base worth naming
        raise StorageError(_describe(url, e)) from None


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    try:
        return fs.exists(path)
    except Exception as e:
        raise StorageError(_describe(url, e)) from None


def download_dir(url: str, files: list[str], dest: Path) -> Path:
    """Copy `files` (relative to `url`) into `dest`, atomically: into a sibling temporary directory
    first, renamed to `dest` when every file is there. Another process finishing first wins and
    its copy is kept."""
    if dest.is_dir():
        return dest
    fs, root = filesystem(url)
    tmp = dest.with_name(f".{dest.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        for rel in files:
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                fs.get_file(f"{root.rstrip('/')}/{rel}", str(target))
            except FileNotFoundError:
                raise FileNotFoundError(f"{url}/{rel} is listed in the manifest but missing") from None
            except Exception as e:
                raise StorageError(_describe(f"{url}/{rel}", e)) from None
        try:
            os.rename(tmp, dest)
        except OSError:
            if not dest.is_dir():
                raise
            log.info("another process cached %s first; using its copy", url)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def upload_dir(local: Path, url: str, files: list[str], last: str) -> None:
    """Upload `files` (relative to `local`) under `url`, `last` (the manifest) after all others,
    so a reader never finds a manifest whose shards are not all there yet."""
    fs, root = filesystem(url)
    try:
        for rel in [*files, last]:
            fs.put_file(str(local / rel), f"{root.rstrip('/')}/{rel}")
    except Exception as e:
        raise StorageError(_describe(url, e).replace("cannot read", "cannot write to")) from None


def cache_root() -> Path:
    """Where downloaded prepared corpora live: $MOEPLAT_CACHE_DIR, else ~/.cache/moeplat (the
    cache trained tokenizers share, moeplat.data.tokenizers)."""
    env = os.environ.get("MOEPLAT_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "moeplat"
