"""Raw documents out of files: plain text, JSONL, JSON, Parquet, CSV, a Hugging Face `datasets` folder, stdin.

Every document comes with where it was found (file and line, or row), so a bad one can be named.
A source is `name=path` or just `path`; the path may be a file, a folder (read recursively) or a glob.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smalto.errors import DataError

FORMATS = ("auto", "text", "lines", "jsonl", "json", "parquet", "csv")
_BY_SUFFIX = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}


@dataclass(kw_only=True)
class Source:
    """One named input. `files` is filled by `resolve`; "-" means stdin."""

    name: str
    spec: str
    files: list[str] = field(default_factory=list)
    hf_dataset: bool = False

    @classmethod
    def parse(cls, text: str) -> Source:
        name, sep, path = text.partition("=")
        if not sep or "/" in name or not name:
            path, name = text, ("stdin" if text == "-" else Path(text.rstrip("/*")).stem or "data")
        return cls(name=name, spec=path)


@dataclass
class ErrorPolicy:
    """`raise` stops at the first bad document, naming file and line; `skip` counts it and goes on."""

    mode: str = "raise"
    skipped: int = 0
    first: list[str] = field(default_factory=list)

    def __call__(self, where: str, problem: str) -> None:
        if self.mode == "raise":
            raise DataError(f"{where}: {problem} (use --on-error skip to skip bad records)")
        self.skipped += 1
        if len(self.first) < 5:
            self.first.append(f"{where}: {problem}")


def resolve(source: Source) -> Source:
    """Expand folder and glob into a sorted file list; a folder of a saved HF dataset stays whole."""
    spec = source.spec
    if spec == "-":
        source.files = ["-"]
        return source
    path = Path(spec)
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "state.json").exists()):
        source.files, source.hf_dataset = [str(path)], True
        return source
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _BY_SUFFIX)
    elif path.is_file():
        files = [str(path)]
    else:
        files = sorted(p for p in glob.glob(spec, recursive=True) if Path(p).is_file())
    if not files:
        raise DataError(f"source {source.name!r}: no input files found at {spec!r} (a file, folder or glob)")
    source.files = files
    return source


def file_digest(path: str) -> dict[str, Any]:
    """Size and sha256 of one input file, for the metadata that says what a dataset was built from."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return {"path": path, "bytes": size, "sha256": h.hexdigest()}


def iter_documents(
    path: str, *, fmt: str, text_field: str, on_error: ErrorPolicy, hf_dataset: bool = False
) -> Iterator[tuple[str, str]]:
    """Yield (text, where) for every document of one file. `where` is "file:line" or "file:row N"."""
    if hf_dataset:
        yield from _hf_dataset(path, text_field, on_error)
        return
    if fmt == "auto":
        fmt = "lines" if path == "-" else _BY_SUFFIX.get(Path(path).suffix.lower(), "text")
    reader: Callable[..., Iterator[tuple[str, str]]] = {
        "text": _text,
        "lines": _lines,
        "jsonl": _jsonl,
        "json": _json,
        "parquet": _parquet,
        "csv": _csv,
    }[fmt]
    yield from reader(path, text_field, on_error)


def _open_bytes(path: str) -> io.BufferedIOBase:
    if path == "-":
        return sys.stdin.buffer  # type: ignore[return-value]
    return open(path, "rb")


def _decoded_lines(path: str, on_error: ErrorPolicy) -> Iterator[tuple[int, str]]:
    name = "<stdin>" if path == "-" else path
    f = _open_bytes(path)
    try:
        for n, raw in enumerate(f, start=1):
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                on_error(f"{name}:{n}", f"not valid UTF-8 (byte {e.start} of the line)")
    finally:
        if path != "-":
            f.close()


def _text(path: str, text_field: str, on_error: ErrorPolicy) -> Iterator[tuple[str, str]]:
    """A whole file is one document."""
    data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    try:
        yield data.decode("utf-8"), path
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        on_error(f"{path}:{line}", "not valid UTF-8")


def _lines(path: str, text_field: str, on_error: ErrorPolicy) -> Iterator[tuple[str, str]]:
    """Each non-blank line is one document."""
    name = "<stdin>" if path == "-" else path
    for n, line in _decoded_lines(path, on_error):
        if line.strip():
            yield line.rstrip("\r\n"), f"{name}:{n}"


def _field(record: Any, text_field: str, where: str, on_error: ErrorPolicy) -> str | None:
    if not isinstance(record, dict):
        on_error(where, f"expected a JSON object with a {text_field!r} field, got {type(record).__name__}")
        return None
    if text_field not in record:
        keys = ", ".join(map(str, list(record)[:10]))
        on_error(where, f"no field {text_field!r} (fields: {keys}); choose one with --text-field")
        return None
    value = record[text_field]
    if not isinstance(value, str):
        on_error(where, f"field {text_field!r} is {type(value).__name__}, not a string")
        return None
    return value


def _jsonl(path: str, text_field: str, on_error: ErrorPolicy) -> Iterator[tuple[str, str]]:
    name = "<stdin>" if path == "-" else path
    for n, line in _decoded_lines(path, on_error):
        if not line.strip():
            continue
        where = f"{name}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            on_error(where, f"not valid JSON ({e.msg} at column {e.colno})")
            continue
        text = _field(record, text_field, where, on_error)
        if text is not None:
            yield text, where


def _json(path: str, text_field: str, on_error: ErrorPolicy) -> Iterator[tuple[str, str]]:
    """A JSON array of objects (or of strings)."""
    raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    try:
        records = json.loads(raw)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON array of records; for one record per line use .jsonl")
    for i, record in enumerate(records):
        where = f"{path}:record {i}"
        text = record if isinstance(record, str) else _field(record, text_field, where, on_error)
        if text is not None:
            yield text, where


@contextmanager
def csv_errors(path: str) -> Iterator[None]:
    """Reading the CSV file `path` in the block: a file that is not UTF-8 or not CSV is a DataError naming it."""
    csv.field_size_limit(1 << 30)
    try:
        yield
    except UnicodeDecodeError:
        raise DataError(f"{path}: not valid UTF-8 (CSV files must be UTF-8)") from None
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV ({e})") from None


def _csv(path: str, text_field: str, on_error: ErrorPolicy) -> Iterator[tuple[str, str]]:
    with csv_errors(path), open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or text_field not in reader.fieldnames:
            raise DataError(
                f"{path}:1: no column {text_field!r} (columns: {reader.fieldnames}); choose one with --text-field"
            )
        for row in reader:
            value = row.get(text_field)
            if value is None:
                on_error(f"{path}:{reader.line_num}", f"row has no value for column {text_field!r}")
                continue
            yield value, f"{path}:{reader.line_num}"


def parquet_file(path: str) -> Any:
    """pyarrow's `ParquetFile` of `path`; a DataError when pyarrow is missing or the file is not Parquet."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading Parquet needs `pyarrow`: pip install 'smalto[data]'") from None
    try:
        return pq.ParquetFile(path)
    except Exception as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None


def _parquet(path: str, text_field: str, on_error: ErrorPolicy) -> Iterator[tuple[str, str]]:
    pf = parquet_file(path)
    if text_field not in pf.schema_arrow.names:
        raise DataError(
            f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names}); choose one with --text-field"
        )
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            if not isinstance(value, str):
                on_error(
                    f"{path}:row {row}", f"column {text_field!r} is {type(value).__name__}, not a string"
                )
            else:
                yield value, f"{path}:row {row}"
            row += 1


def datasets_folder(path: str, install: str) -> Any:
    """The `datasets` Dataset saved in the folder `path` (`save_to_disk`); a DataError naming the `install` command
    when `datasets` is missing, and the split folders when `path` holds several."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a Hugging Face datasets folder; reading it needs `{install}`") from None
    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        raise DataError(
            f"{path} holds splits {list(ds)}; pass one split folder, e.g. {path}/{next(iter(ds))}"
        )
    return ds


def _hf_dataset(path: str, text_field: str, on_error: ErrorPolicy) -> Iterator[tuple[str, str]]:
    ds = datasets_folder(path, "pip install datasets")
    if text_field not in ds.column_names:
        raise DataError(
            f"{path}: no column {text_field!r} (columns: {ds.column_names}); choose one with --text-field"
        )
    for i, value in enumerate(ds[text_field]):
        if isinstance(value, str):
            yield value, f"{path}:row {i}"
        else:
            on_error(f"{path}:row {i}", f"column {text_field!r} is {type(value).__name__}, not a string")
