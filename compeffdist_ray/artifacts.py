"""Run directories: one folder per stage holding Parquet files and, written last, a manifest.

A run directory is a local path or any URI pyarrow's filesystems understand (s3://, gs://,
hdfs://, file://). A stage folder without `_manifest.json` was killed half-way: it is never
read, and the next run clears and redoes it. Files are written under a temporary name and
moved into place, so a crash never leaves a file that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from compeffdist_ray.errors import UserError

__all__ = ["RunDir", "Manifest", "fingerprint"]

MANIFEST = "_manifest.json"


def fingerprint(payload: Any) -> str:
    """A short, stable hash of a JSON-able payload."""
    blob = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


@dataclass
class Manifest:
    stage: str
    fingerprint: str
    output_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    rows: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=lambda: {"input": 0, "output": 0})
    wall_time_s: float = 0.0
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    inputs: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        data = json.loads(text)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def to_json(self) -> str:
        from dataclasses import asdict

        return json.dumps(asdict(self), indent=2, sort_keys=False, default=str)


class RunDir:
    """A run directory on a local disk or a pyarrow filesystem."""

    def __init__(self, uri: str):
        import pyarrow.fs as pafs

        self.uri = uri
        if "://" in uri and not uri.startswith("file://"):
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(uri)
            except Exception as exc:  # pyarrow raises several types for bad URIs
                raise UserError(f"run directory {uri!r} is not a usable filesystem URI: {exc}") from None
            self.local = False
        else:
            path = uri[len("file://") :] if uri.startswith("file://") else uri
            self.fs = pafs.LocalFileSystem()
            self.root = os.path.abspath(os.path.expanduser(path))
            self.local = True
        self.fs.create_dir(self.root, recursive=True)

    # -- paths -----------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def exists(self, *parts: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    # -- manifests -------------------------------------------------------------------------
    def read_manifest(self, stage: str) -> Manifest | None:
        if not self.exists(stage, MANIFEST):
            return None
        with self.fs.open_input_stream(self.path(stage, MANIFEST)) as f:
            return Manifest.from_json(f.read().decode("utf-8"))

    def write_manifest(self, manifest: Manifest) -> None:
        self.write_bytes(manifest.stage, MANIFEST, manifest.to_json().encode("utf-8"))

    def state(self, stage: str) -> str:
        """'complete' (manifest present), 'incomplete' (folder, no manifest) or 'missing'."""
        if self.exists(stage, MANIFEST):
            return "complete"
        return "incomplete" if self.exists(stage) else "missing"

    def clear_stage(self, stage: str) -> None:
        """Remove a stage's folder; the manifest goes first so a crash mid-way reads as incomplete."""
        if self.exists(stage, MANIFEST):
            self.fs.delete_file(self.path(stage, MANIFEST))
        if self.exists(stage):
            self.fs.delete_dir(self.path(stage))

    # -- files -----------------------------------------------------------------------------
    def write_bytes(self, stage: str, name: str, data: bytes) -> None:
        self.fs.create_dir(self.path(stage), recursive=True)
        tmp = self.path(stage, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, self.path(stage, name))

    def write_table(self, stage: str, name: str, table: Any) -> None:
        """Write a pyarrow Table (or pandas DataFrame) as `<stage>/<name>.parquet`, atomically."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not isinstance(table, pa.Table):
            table = pa.Table.from_pandas(table, preserve_index=False)
        self.fs.create_dir(self.path(stage), recursive=True)
        tmp = self.path(stage, f".{name}.parquet.tmp-{uuid.uuid4().hex[:8]}")
        pq.write_table(table, tmp, filesystem=self.fs)
        self.fs.move(tmp, self.path(stage, f"{name}.parquet"))

    def read_bytes(self, stage: str, name: str) -> bytes | None:
        """`<stage>/<name>` as bytes, or None when it is not there."""
        if not self.exists(stage, name):
            return None
        with self.fs.open_input_stream(self.path(stage, name)) as f:
            return f.read()

    def read_table(self, stage: str, name: str):
        import pyarrow.parquet as pq

        path = self.path(stage, f"{name}.parquet")
        if not self.exists(stage, f"{name}.parquet"):
            raise UserError(f"artifact {path} is missing; rerun the stage '{stage}'")
        return pq.read_table(path, filesystem=self.fs)

    def read_df(self, stage: str, name: str):
        return self.read_table(stage, name).to_pandas()

    def upload_dir(self, local_dir: str, stage: str, name: str) -> None:
        """Copy a local directory into `<stage>/<name>/` (under a temporary name, then renamed)."""
        import pyarrow.fs as pafs

        final = self.path(stage, name)
        tmp = self.path(stage, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        self.fs.create_dir(tmp, recursive=True)
        pafs.copy_files(local_dir, tmp, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        if self.exists(stage, name):
            self.fs.delete_dir(final)
        self.fs.move(tmp, final)

    def local_dir(self, stage: str, name: str, cache_root: str | None = None) -> str:
        """A local path to `<stage>/<name>/`: the path itself on a local run dir, else a downloaded copy."""
        import tempfile

        import pyarrow.fs as pafs

        if self.local:
            return self.path(stage, name)
        dest = os.path.join(cache_root or tempfile.mkdtemp(prefix="compeffdist-"), stage, name)
        if not os.path.isdir(dest):
            pafs.copy_files(self.path(stage, name), dest + ".part", source_filesystem=self.fs,
                            destination_filesystem=pafs.LocalFileSystem())
            os.replace(dest + ".part", dest)
        return dest

    def write_json(self, name: str, data: Any) -> None:
        self.fs.create_dir(self.root, recursive=True)
        tmp = self.path(f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        with self.fs.open_output_stream(tmp) as f:
            f.write(json.dumps(data, indent=2, default=str).encode("utf-8"))
        self.fs.move(tmp, self.path(name))

    def write_text(self, name: str, text: str) -> None:
        tmp = self.path(f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        with self.fs.open_output_stream(tmp) as f:
            f.write(text.encode("utf-8"))
        self.fs.move(tmp, self.path(name))

    def read_text(self, name: str) -> str | None:
        if not self.exists(name):
            return None
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read().decode("utf-8")
