"""Reading user texts: JSONL, JSON arrays, CSV, Parquet or plain text, local or remote.

Returns a DataFrame with the columns `text_id` and `text`: texts stripped, empty texts and
duplicates removed and counted. Ids come from the configured id column, or from a hash of the
text when the file has none.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from importlib import resources

from compeffdist_ray.config import BUILTIN_CORPUS, InputConfig
from compeffdist_ray.errors import UserError, parse_json

__all__ = ["Corpus", "read_corpus", "read_records", "file_digest", "resolve_input_path", "text_id_of"]

_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "text",
    ".text": "text",
}


@dataclass
class Corpus:
    df: "object"  # pandas.DataFrame with text_id, text
    source: str
    read_rows: int
    dropped: dict[str, int] = field(default_factory=dict)


def text_id_of(text: str) -> str:
    return "t" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:15]


def _clean_id(value) -> str | None:
    """An id as text; None for missing or blank ids (1.0 from a float column becomes '1')."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    return text or None


def resolve_input_path(path: str) -> str:
    if path == BUILTIN_CORPUS:
        return str(resources.files("compeffdist_ray") / "data" / "sample_corpus.jsonl")
    return path


def _open(path: str, key: str = "input.path"):
    """(filesystem, path) for a local path or a pyarrow URI; raises UserError if absent."""
    import pyarrow.fs as pafs

    if "://" in path and not path.startswith("file://"):
        try:
            fs, inner = pafs.FileSystem.from_uri(path)
        except Exception as exc:
            raise UserError(f"{key} {path!r} is not a readable URI: {exc}") from None
    else:
        inner = os.path.abspath(os.path.expanduser(path[len("file://") :] if path.startswith("file://") else path))
        fs = pafs.LocalFileSystem()
    info = fs.get_file_info(inner)
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"input file not found: {path} (set {key} to an existing file)")
    if info.type == pafs.FileType.Directory:
        raise UserError(f"{key} {path} is a directory; give one file (jsonl, json, csv, parquet or txt)")
    return fs, inner


def _detect(path: str, fmt: str, key: str = "input.format") -> str:
    if fmt != "auto":
        return fmt
    name = path.lower()
    for suffix in (".gz", ".bz2", ".zst"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    ext = os.path.splitext(name)[1]
    if ext not in _EXTENSIONS:
        raise UserError(
            f"cannot tell the format of {path} from its extension {ext or '(none)'}; "
            f"set {key} to one of jsonl, json, csv, parquet, text" if key == "input.format" else
            f"give {key} a .jsonl, .json, .csv or .parquet name"
        )
    return _EXTENSIONS[ext]


def _read_records(fs, path: str, fmt: str, display: str):
    """Read the file into a pandas DataFrame (text format: one column 'text')."""
    import pandas as pd
    import pyarrow as pa

    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path, filesystem=fs).to_pandas()
        except (pa.ArrowInvalid, OSError) as exc:
            raise UserError(f"cannot read {display} as Parquet: {exc}") from None
    with fs.open_input_stream(path, compression="detect") as f:
        raw = f.read()
    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{display} is not UTF-8 text (byte {exc.start}); re-encode it as UTF-8") from None
    if fmt == "text":
        return pd.DataFrame({"text": content.splitlines()})
    if fmt == "csv":
        try:
            return pd.read_csv(io.StringIO(content), dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise UserError(f"cannot read {display} as CSV: {str(exc).splitlines()[0]}") from None
    if fmt == "json":
        data = parse_json(content, display)
        if isinstance(data, dict):  # {"key": [texts...]} layouts: flatten the lists
            lists = [v for v in data.values() if isinstance(v, list)]
            if not lists:
                raise UserError(f"{display}: a JSON object must hold lists of records or texts")
            data = [item for lst in lists for item in lst]
        if not isinstance(data, list):
            raise UserError(f"{display}: expected a JSON array of records or strings")
        records = [{"text": item} if isinstance(item, str) else item for item in data]
        if any(not isinstance(r, dict) for r in records):
            raise UserError(f"{display}: JSON array items must be objects or strings")
        return pd.DataFrame.from_records(records)
    # jsonl
    records = []
    for lineno, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{display} line {lineno}: not valid JSON ({exc.msg})") from None
        records.append({"text": item} if isinstance(item, str) else item)
    return pd.DataFrame.from_records(records)


def read_records(path: str, *, key: str, required: tuple[str, ...] = ()):
    """A table file (jsonl, json, csv, parquet; local or URI) as a DataFrame, its required columns checked.

    Errors name the config key that gave the path (`key`), the columns missing and those present.
    """
    fs, inner = _open(path, key)
    df = _read_records(fs, inner, _detect(path, "auto", key), path)
    missing = [c for c in required if c not in df.columns]
    if missing:
        have = ", ".join(map(str, df.columns[:20])) or "(none)"
        raise UserError(f"{path} (from {key}) has no column {', '.join(repr(c) for c in missing)}; "
                        f"it needs {', '.join(required)} and has: {have}")
    return df


def file_digest(path: str, key: str) -> str:
    """sha256 of a file's bytes (local or URI): a fingerprint of input data named in the config."""
    fs, inner = _open(path, key)
    h = hashlib.sha256()
    with fs.open_input_stream(inner) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def read_corpus(cfg: InputConfig) -> Corpus:
    """Read, clean and de-duplicate the user texts named by `cfg`."""
    import pandas as pd

    display = cfg.path
    path = resolve_input_path(cfg.path)
    fs, inner = _open(path)
    fmt = _detect(path, cfg.format)
    df = _read_records(fs, inner, fmt, display)
    read_rows = len(df)
    if read_rows == 0:
        raise UserError(f"the corpus {display} is empty; give a file with at least one user text")
    if cfg.text_column not in df.columns:
        cols = ", ".join(map(str, df.columns[:20]))
        raise UserError(
            f"text column {cfg.text_column!r} is not in {display}; its columns are: {cols} "
            "(set input.text_column)"
        )
    dropped: dict[str, int] = {}
    texts = df[cfg.text_column].map(lambda v: v.strip() if isinstance(v, str) else None)
    if cfg.id_column and cfg.id_column in df.columns:
        ids = df[cfg.id_column].map(_clean_id)
    else:
        ids = texts.map(lambda t: text_id_of(t) if t else None)
    out = pd.DataFrame({"text_id": ids, "text": texts})
    empty = out["text"].isna() | (out["text"] == "")
    if empty.any():
        dropped["empty_text"] = int(empty.sum())
        out = out[~empty]
    missing_id = out["text_id"].isna()
    if missing_id.any():  # rows without an id get one from their text
        out.loc[missing_id, "text_id"] = out.loc[missing_id, "text"].map(text_id_of)
    dup_text = out.duplicated("text", keep="first")
    if dup_text.any():
        dropped["duplicate_text"] = int(dup_text.sum())
        out = out[~dup_text]
    dup_id = out.duplicated("text_id", keep="first")
    if dup_id.any():
        dropped["duplicate_id"] = int(dup_id.sum())
        out = out[~dup_id]
    if len(out) == 0:
        raise UserError(f"the corpus {display} has no usable text (all {read_rows} rows empty or duplicates)")
    return Corpus(df=out.reset_index(drop=True), source=display, read_rows=read_rows, dropped=dropped)
