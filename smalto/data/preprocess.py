"""Finetuning rows out of files, and the named preprocessing step that turns a row into an example.

Files: JSONL, a JSON array of objects, Parquet, CSV, a folder of those (read in sorted order), or a folder written
by Hugging Face `datasets`' `save_to_disk` (needs the `datasets` package). Each row comes with where it was found
("file:line", "file:record N" or "file:row N").

Preprocessing, as llm-foundry's `preprocessing_fn`: a function from a row (a dict) to an example, either
{"prompt": str, "response": str} or {"messages": [{"role", "content"}, ...]}. Built in:
    prompt_response  the row's prompt/response (llm-foundry's keys), as they are (`auto` also takes messages rows)
    dolly            instruction (+ context or input, after a newline) / response or output, in the template
                     MPT-7B-Instruct was trained with (smalto.data.templates.DOLLY_PROMPT)
    alpaca           instruction / input / output in Stanford Alpaca's template (with or without input)
    chat             messages (or conversations in ShareGPT's from/value form), rendered with the tokenizer's chat
                     template, else ChatML
    vicuna           ShareGPT conversations (or messages) for Vicuna: like `chat`, rendered in Vicuna v1.1's
                     template (smalto.data.templates.VICUNA_TEMPLATE) unless the tokenizer has its own
    module:function  your own: an importable module and a function in it
A field a step needs that is missing or not a string is a `RowError` naming the field.
"""

from __future__ import annotations

import csv
import importlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from smalto.data.sources import csv_errors, datasets_folder, parquet_file
from smalto.data.templates import ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT, DOLLY_PROMPT
from smalto.errors import ConfigError, DataError

SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".csv")
Example = dict[str, Any]


class RowError(ValueError):
    """A row a preprocessing step cannot use; the message names the field."""


# ---- reading rows ----


def data_files(path: str) -> list[str]:
    """The files a source path means: one file, a folder's data files (recursively, sorted), or a saved HF dataset."""
    p = Path(path)
    if p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "state.json").is_file()):
        return [str(p)]
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(f"finetuning data {path}: no {', '.join(SUFFIXES)} files in the folder")
        return files
    if not p.is_file():
        raise DataError(f"finetuning data {path} does not exist (a file or folder of {', '.join(SUFFIXES)})")
    if p.suffix.lower() not in SUFFIXES:
        raise DataError(f"finetuning data {path}: unknown file type; use one of {', '.join(SUFFIXES)}")
    return [str(p)]


def read_rows(path: str, on_bad: Callable[[str, str], None]) -> Iterator[tuple[Any, str]]:
    """(row, where) for every row of every file of `path`; undecodable lines go to `on_bad(where, problem)`."""
    for f in data_files(path):
        if Path(f).is_dir():
            yield from _hf_rows(f)
            continue
        suffix = Path(f).suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            yield from _jsonl_rows(f, on_bad)
        elif suffix == ".json":
            yield from _json_rows(f)
        elif suffix == ".csv":
            yield from _csv_rows(f)
        else:
            yield from _parquet_rows(f)


def _jsonl_rows(path: str, on_bad: Callable[[str, str], None]) -> Iterator[tuple[Any, str]]:
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                on_bad(where, f"not valid UTF-8 (byte {e.start} of the line)")
                continue
            if not line.strip():
                continue
            try:
                yield json.loads(line), where
            except json.JSONDecodeError as e:
                on_bad(where, f"not valid JSON ({e.msg} at column {e.colno})")


def _json_rows(path: str) -> Iterator[tuple[Any, str]]:
    try:
        rows = json.loads(Path(path).read_bytes())
    except UnicodeDecodeError:
        raise DataError(f"{path}: not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON array of rows; for one row per line use .jsonl")
    for i, row in enumerate(rows):
        yield row, f"{path}:record {i}"


def _csv_rows(path: str) -> Iterator[tuple[Any, str]]:
    with csv_errors(path), open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        for row in reader:
            yield dict(row), f"{path}:{reader.line_num}"


def _parquet_rows(path: str) -> Iterator[tuple[Any, str]]:
    pf = parquet_file(path)
    try:
        table = pf.read()
    except Exception as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    for i, row in enumerate(table.to_pylist()):
        yield row, f"{path}:row {i}"


def _hf_rows(path: str) -> Iterator[tuple[Any, str]]:
    ds = datasets_folder(path, 'pip install "smalto[finetune]"')
    for i, row in enumerate(ds):
        yield dict(row), f"{path}:row {i}"


# ---- preprocessing steps ----


def _text(row: dict[str, Any], *keys: str, required: bool = True) -> str:
    """The first of `keys` the row has, as a string ('' when none and not required)."""
    for key in keys:
        if key in row and row[key] is not None:
            if not isinstance(row[key], str):
                raise RowError(f"field {key!r} is {type(row[key]).__name__}, not a string")
            return str(row[key])
    if required:
        fields = ", ".join(map(str, row)) or "none"
        raise RowError(f"field {' or '.join(map(repr, keys))} is missing (fields: {fields})")
    return ""


def prompt_response(row: dict[str, Any]) -> Example:
    """The row's own example (checked after this step: prompt and response strings, or messages)."""
    if "messages" in row:
        return {"messages": row["messages"]}
    if "prompt" in row or "response" in row:
        return {"prompt": row.get("prompt"), "response": row.get("response")}
    raise RowError(f"expected keys prompt/response or messages, got {', '.join(map(str, row)) or 'none'}")


def dolly(row: dict[str, Any]) -> Example:
    """databricks-dolly-15k (instruction, context, response) or its H4 copy (instruction, input, output): a context
    follows the instruction after one newline, as llm-foundry's dolly preprocessing does."""
    instruction = _text(row, "instruction")
    context = _text(row, "context", "input", required=False)
    if context:
        instruction = instruction + "\n" + context
    return {
        "prompt": DOLLY_PROMPT.format(instruction=instruction),
        "response": _text(row, "response", "output"),
    }


def alpaca(row: dict[str, Any]) -> Example:
    """Stanford Alpaca (instruction, input, output); the template has no newline after "### Response:", so a
    response not starting with whitespace gets a newline, as Alpaca's data has it."""
    instruction, given = _text(row, "instruction"), _text(row, "input", required=False)
    prompt = (
        ALPACA_PROMPT_INPUT.format(instruction=instruction, input=given)
        if given
        else ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    )
    response = _text(row, "output", "response")
    return {"prompt": prompt, "response": response if response[:1].isspace() else "\n" + response}


def chat(row: dict[str, Any]) -> Example:
    if "messages" in row:
        return {"messages": row["messages"]}
    if isinstance(row.get("conversations"), list):  # ShareGPT: {"from": human|gpt|system, "value": ...}
        roles = {"human": "user", "gpt": "assistant", "system": "system"}
        out = []
        for i, m in enumerate(row["conversations"]):
            if not isinstance(m, dict) or m.get("from") not in roles:
                raise RowError(f"field 'conversations'[{i}]: 'from' must be one of {', '.join(roles)}")
            out.append({"role": roles[m["from"]], "content": m.get("value")})
        return {"messages": out}
    raise RowError(f"field 'messages' is missing (fields: {', '.join(map(str, row)) or 'none'})")


PREPROCESSORS: dict[str, Callable[[dict[str, Any]], Example]] = {
    "prompt_response": prompt_response,
    "dolly": dolly,
    "alpaca": alpaca,
    "chat": chat,
    "vicuna": chat,  # the same rows; the recipe's template (vicuna) renders them
}


def preprocessor(name: str) -> Callable[[dict[str, Any]], Example]:
    """A built-in step by name, or `module:function`."""
    if name in PREPROCESSORS:
        return PREPROCESSORS[name]
    module, sep, attr = name.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(
            f"preprocessing = {name!r} is not allowed; choose one of: {', '.join(PREPROCESSORS)}, or module:function"
        )
    try:
        fn = getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise ConfigError(f"preprocessing = {name!r}: cannot import {module} ({e})") from None
    except AttributeError:
        raise ConfigError(f"preprocessing = {name!r}: {module} has no {attr}") from None
    if not callable(fn):
        raise ConfigError(f"preprocessing = {name!r} is not a function")
    return fn  # type: ignore[no-any-return]
