"""Where a reference cache lives: a local folder, or a prefix on an object store (s3://, gs://).

    store = open_store("s3://bucket/caches/hh")       # or a local path
    store.read("manifest.json")                       # bytes, or None when absent
    store.write("train/shard-00000-1a2b.arrow", data) # complete or absent
    store.list("train")                               # {name: size} of the objects under train/
    store.local("train/shard-...arrow", sha256)       # a local file with exactly those bytes

A local folder writes through core.atomic (temporary name, fsync, rename). An object store has no
rename: one PUT is complete or absent by itself, shard names are unique (they carry a prefix of
their sha256) so a reader never sees an object replaced by other bytes, and the manifest is
written last. Shards are fetched once per node into a local folder (fetch_dir(), named by sha256,
checked as they arrive, one process per object at a time) and memory-mapped from there.

Credentials come from the client's own chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
~/.aws/credentials, instance roles); `store.url` and every message show the bucket and prefix only.
Google Cloud Storage: the application default credentials (GOOGLE_APPLICATION_CREDENTIALS, gcloud's
login, the metadata server). The endpoint of an S3-compatible server: AWS_ENDPOINT_URL_S3 or
AWS_ENDPOINT_URL; of a GCS emulator: STORAGE_EMULATOR_HOST (anonymous, as Google's clients do); for
either, the URL's `?endpoint_override=http://host:port` (with the usual credentials).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from dpo_dist.core.atomic import atomic_file, atomic_write_bytes
from dpo_dist.core.errors import UserError
from dpo_dist.core.hashing import sha256_file, store_dir

SCHEMES = ("s3", "gs", "gcs")


class StoreError(UserError, OSError):
    """The object store cannot be reached, refuses the credentials, or has no such bucket."""


class ChecksumError(UserError, ValueError):
    """An object's bytes are not the ones its manifest entry (or its name) records."""


def is_url(location) -> bool:
    return isinstance(location, str) and location.split("://", 1)[0] in SCHEMES and "://" in location


def fetch_dir() -> Path:
    """Where shards of object-store caches are fetched to: $DPO_DIST_FETCH_DIR (a node-local disk on
    a cluster), else $DPO_DIST_CACHE/objects."""
    return Path(os.environ.get("DPO_DIST_FETCH_DIR") or store_dir() / "objects")


def open_store(location) -> "LocalStore | ObjectStore":
    """A store for a local path or an s3:// / gs:// URL (a store is returned as it is)."""
    if isinstance(location, (LocalStore, ObjectStore)):
        return location
    if is_url(str(location)):
        return ObjectStore(str(location))
    return LocalStore(Path(location))


class LocalStore:
    remote = False

    def __init__(self, root: Path):
        self.root = Path(root)
        self.url = str(self.root)

    def __str__(self) -> str:
        return self.url

    def path(self, rel: str) -> Path:
        return self.root / rel

    def read(self, rel: str) -> bytes | None:
        try:
            return self.path(rel).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, rel: str, payload: bytes) -> None:
        atomic_write_bytes(self.path(rel), payload)

    def list(self, prefix: str) -> dict[str, int]:
        folder = self.path(prefix)
        if not folder.is_dir():
            return {}
        return {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}

    def exists(self) -> bool:
        """Whether anything but scoring's TensorBoard folder is here."""
        return self.root.exists() and any(p.name != "tb" for p in self.root.iterdir())

    def delete(self, rel: str) -> None:
        from dpo_dist.core.removal import remove_tree

        remove_tree(self.path(rel), self.root)

    def local(self, rel: str, sha256: str | None = None) -> Path:
        """The file itself; checked against `sha256` when given."""
        path = self.path(rel)
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing")
        if sha256 is not None and sha256_file(path) != sha256:
            raise ChecksumError(f"{path}: checksum mismatch (file changed or corrupt)")
        return path

    def matches(self, rel: str, sha256: str) -> bool:
        path = self.path(rel)
        return path.is_file() and sha256_file(path) == sha256

    def tb_dir(self) -> Path:
        return self.root / "tb"


class ObjectStore:
    """A bucket prefix through pyarrow.fs (S3 and S3-compatible servers, Google Cloud Storage)."""

    remote = True

    def __init__(self, url: str):
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.scheme = "gs" if parts.scheme == "gcs" else parts.scheme
        self.bucket = parts.hostname or ""
        self.prefix = parts.path.strip("/")
        if not self.bucket:
            raise StoreError(f"{url.split('?')[0]}: no bucket in the URL (write {self.scheme}://BUCKET/PREFIX)")
        self.url = f"{self.scheme}://{self.bucket}/{self.prefix}".rstrip("/")  # no credentials, no query
        if parts.username or parts.password:
            raise StoreError(f"{self.url}: credentials in the URL are not read (they would reach logs and run.json); "
                             "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, instead")
        if self.scheme == "s3":
            self.endpoint = (query.get("endpoint_override") or os.environ.get("AWS_ENDPOINT_URL_S3")
                             or os.environ.get("AWS_ENDPOINT_URL") or "")
        else:  # STORAGE_EMULATOR_HOST: the variable Google's own clients read for a local server
            self.endpoint = query.get("endpoint_override") or os.environ.get("STORAGE_EMULATOR_HOST") or ""
        self._query = query
        self._fs = None

    def __str__(self) -> str:
        return self.url

    @property
    def fs(self):
        if self._fs is None:
            import pyarrow.fs as pafs

            if self.scheme == "s3":
                kwargs = dict(connect_timeout=5, request_timeout=60,
                              retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3))
                if self.endpoint:
                    ep = urlsplit(self.endpoint)
                    kwargs.update(endpoint_override=ep.netloc or ep.path, scheme=ep.scheme or "https")
                region = self._query.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                if region or self.endpoint:
                    kwargs["region"] = region or "us-east-1"
                self._fs = pafs.S3FileSystem(**kwargs)
            else:
                from datetime import timedelta

                # a bounded retry: an unreachable endpoint is reported in seconds, not after 15 minutes
                kwargs = dict(retry_time_limit=timedelta(seconds=20))
                if self.endpoint:
                    ep = urlsplit(self.endpoint if "://" in self.endpoint else f"http://{self.endpoint}")
                    kwargs.update(endpoint_override=ep.netloc, scheme=ep.scheme)
                    # an emulator (STORAGE_EMULATOR_HOST) takes no credentials, as with Google's clients
                    kwargs["anonymous"] = not self._query.get("endpoint_override")
                self._fs = pafs.GcsFileSystem(**kwargs)
        return self._fs

    def key(self, rel: str) -> str:
        return "/".join(p for p in (self.bucket, self.prefix, rel.strip("/")) if p)

    def path(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    @contextlib.contextmanager
    def _errors(self, doing: str):
        """pyarrow's OSError as one line that names the URL and what to check (never a credential)."""
        try:
            yield
        except OSError as e:
            if isinstance(e, UserError):
                raise
            raise StoreError(f"{self.url}: {doing}: {explain(str(e), self.endpoint, self.scheme)}") from None

    def read(self, rel: str) -> bytes | None:
        import pyarrow.fs as pafs

        with self._errors(f"reading {rel}"):
            if self.fs.get_file_info(self.key(rel)).type == pafs.FileType.NotFound:
                return None
            with self.fs.open_input_stream(self.key(rel)) as f:
                return f.read()

    def write(self, rel: str, payload: bytes) -> None:
        with self._errors(f"writing {rel}"):
            with self.fs.open_output_stream(self.key(rel)) as f:
                f.write(payload)

    def list(self, prefix: str) -> dict[str, int]:
        import pyarrow.fs as pafs

        with self._errors(f"listing {prefix or '/'}"):
            selector = pafs.FileSelector(self.key(prefix), allow_not_found=True)
            return {info.base_name: info.size for info in self.fs.get_file_info(selector)
                    if info.type == pafs.FileType.File}

    def exists(self) -> bool:
        """Whether anything is under the prefix (one listing: also the first check of endpoint,
        credentials and bucket)."""
        import pyarrow.fs as pafs

        with self._errors("listing the prefix"):
            if self.scheme == "gs" and self.fs.get_file_info(self.bucket).type == pafs.FileType.NotFound:
                raise OSError("NO_SUCH_BUCKET")  # GCS lists a missing bucket as empty
            # GCS's listing shows the folders below a prefix only where the server returns them (its
            # emulators do not): there, anything below counts
            selector = pafs.FileSelector(self.key(""), allow_not_found=True, recursive=self.scheme == "gs")
            return any(True for _ in self.fs.get_file_info(selector))

    def delete(self, rel: str) -> None:
        import pyarrow.fs as pafs

        with self._errors(f"deleting {rel}"):
            info = self.fs.get_file_info(self.key(rel))
            if info.type == pafs.FileType.Directory:
                self.fs.delete_dir_contents(self.key(rel), missing_dir_ok=True)
            elif info.type == pafs.FileType.File:
                self.fs.delete_file(self.key(rel))

    def local(self, rel: str, sha256: str | None = None) -> Path:
        """A local copy under fetch_dir(), named by its sha256 and checked as it arrives; one process
        per node fetches it, the others wait on its lock and then find it."""
        if sha256 is None:
            raise ValueError("an object is fetched by its checksum")
        folder = fetch_dir()
        path = folder / f"{sha256}.arrow"
        if path.exists():
            return path
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f".{sha256}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if path.exists():
                return path
            h = hashlib.sha256()
            with self._errors(f"fetching {rel}"):
                with atomic_file(path) as out, self.fs.open_input_stream(self.key(rel)) as f:
                    while block := f.read(1 << 22):
                        h.update(block)
                        out.write(block)
                    if h.hexdigest() != sha256:
                        raise ChecksumError(f"{self.path(rel)}: checksum mismatch (object changed or corrupt)")
        return path

    def matches(self, rel: str, sha256: str) -> bool:
        """Whether the object in the store (not a local copy) has exactly these bytes: streamed and hashed."""
        import pyarrow.fs as pafs

        h = hashlib.sha256()
        with self._errors(f"reading {rel}"):
            if self.fs.get_file_info(self.key(rel)).type != pafs.FileType.File:
                return False
            with self.fs.open_input_stream(self.key(rel)) as f:
                while block := f.read(1 << 22):
                    h.update(block)
        return h.hexdigest() == sha256

    def tb_dir(self) -> Path:
        """Scoring's TensorBoard events go to a local folder named after the URL (TensorBoard's
        writer needs a file system)."""
        return store_dir() / "tb" / hashlib.sha256(self.url.encode()).hexdigest()[:16]


def explain(message: str, endpoint: str, scheme: str = "s3") -> str:
    """What an S3/GCS client error means for the user, in a few words."""
    where = endpoint or "the default endpoint"
    if any(s in message for s in ("NETWORK_CONNECTION", "curlCode", "Could not resolve", "Could not connect")):
        variable = "AWS_ENDPOINT_URL" if scheme == "s3" else "STORAGE_EMULATOR_HOST"
        return f"cannot reach the object store at {where} (check {variable} or ?endpoint_override=, and the network)"
    if any(s in message for s in ("INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "ACCESS_DENIED",
                                  "AccessDenied", "InvalidAccessKeyId", "403", "PERMISSION_DENIED", "UNAUTHENTICATED")):
        credentials = ("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or ~/.aws/credentials" if scheme == "s3"
                       else "GOOGLE_APPLICATION_CREDENTIALS or gcloud's application default login")
        return f"access denied by {where}: check the credentials ({credentials}) and the bucket's policy"
    if "NO_SUCH_BUCKET" in message or "NoSuchBucket" in message:
        return "no such bucket (create it first)"
    return message.splitlines()[0][:300]
