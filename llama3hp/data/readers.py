"""Reading documents from text files and JSONL: shared by `prepare` and `curate`.

One document is one text file or one JSONL line (its `text_field` string, plus `url` and `id`
when present). Directories are walked recursively in sorted order, skipping hidden entries;
explicitly named inputs keep the order given. Large JSONL files are cut into blocks of whole
lines (`jsonl_blocks`) so a process pool can share them; every error is a one-line `DataError`
naming the file (and line) and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llama3hp.data.errors import DataError

__all__ = [
    "DEFAULT_EXTENSIONS",
    "Task",
    "Record",
    "expand_inputs",
    "jsonl_blocks",
    "read_text_file",
    "read_jsonl_records",
    "read_jsonl_objects",
    "read_task",
]

# .jsonl is always read as JSONL, wherever it is found; the others are read whole as one document.
DEFAULT_EXTENSIONS = (".py", ".txt", ".md", ".rst")
JSONL_BLOCK_BYTES = 4 << 20  # big enough to amortise task overhead, small enough to balance 2 workers


@dataclass(frozen=True)
class Task:
    """A unit of reading: a whole text file, or `length` bytes of whole JSONL lines at `offset`."""

    kind: str  # "text" | "jsonl"
    index: int  # position of the input file in the expanded list
    path: str
    offset: int = 0
    length: int = 0
    first_line: int = 1


@dataclass(frozen=True)
class Record:
    """One document as read: its text, and the JSONL `url` / `id` fields when present."""

    text: str
    id: str
    url: str | None = None


def _walk(directory: Path, extensions: tuple[str, ...]) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and name.endswith(extensions):
                found.append(Path(dirpath) / name)
    return sorted(found)


def expand_inputs(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    extensions: tuple[str, ...],
    *,
    walk_jsonl: bool = False,
) -> list[Path]:
    """Files to read: named files as given, directories walked for `extensions` (and .jsonl if asked)."""
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    wanted = tuple(extensions) + ((".jsonl",) if walk_jsonl else ())
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files.extend(_walk(p, wanted))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"input {p} does not exist; pass existing files or directories")
    if not files:
        raise DataError(
            f"empty input: no files with extensions {' '.join(extensions)} or .jsonl in {list(map(str, inputs))}"
        )
    return files


def jsonl_blocks(path: Path, index: int, block_bytes: int = JSONL_BLOCK_BYTES) -> tuple[list[Task], str]:
    """Tasks covering whole lines of a JSONL file, plus the file's sha256."""
    h = hashlib.sha256()
    tasks = []
    offset, line_no, carry = 0, 1, b""
    try:
        with open(path, "rb") as f:
            while True:
                block = f.read(block_bytes)
                h.update(block)
                data = carry + block
                if not block:
                    if data:
                        tasks.append(Task("jsonl", index, str(path), offset, len(data), line_no))
                    break
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    carry = data
                    continue
                tasks.append(Task("jsonl", index, str(path), offset, cut, line_no))
                line_no += data.count(b"\n", 0, cut)
                offset += cut
                carry = data[cut:]
    except OSError as e:
        raise DataError(f"cannot read input file {path}: {e.strerror}") from None
    return tasks, h.hexdigest()


def read_text_file(path: str | os.PathLike) -> tuple[str, bytes]:
    """(text, raw bytes) of a UTF-8 text file."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read input file {path}: {e.strerror}") from None
    try:
        return raw.decode("utf-8"), raw
    except UnicodeDecodeError as e:
        raise DataError(
            f"input file {path} is not valid UTF-8 (byte {e.start}); convert it or leave it out"
        ) from None


def _optional_str(obj: dict, key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and key == "id":
        return str(value)
    raise DataError(f"{where} field '{key}' is {type(value).__name__}, not a string")


def read_jsonl_records(task: Task, text_field: str = "text", *, metadata: bool = False) -> list[Record]:
    """The documents of a JSONL task; `metadata` also reads `url` and `id` (default id: path:line)."""
    records = []
    for where, obj in read_jsonl_objects(task):
        if not isinstance(obj, dict) or text_field not in obj:
            raise DataError(
                f"{where} has no '{text_field}' field; set text_field to the field holding the text"
            )
        text = obj[text_field]
        if not isinstance(text, str):
            raise DataError(f"{where} field '{text_field}' is {type(text).__name__}, not a string")
        if metadata:
            doc_id = _optional_str(obj, "id", where) or where.replace(" line ", ":")
            records.append(Record(text, doc_id, _optional_str(obj, "url", where)))
        else:
            records.append(Record(text, ""))
    return records


def read_jsonl_objects(task: Task) -> list[tuple[str, Any]]:
    """(where, object) of every non-blank line of a JSONL task; `where` is "path line N"."""
    try:
        with open(task.path, "rb") as f:
            f.seek(task.offset)
            data = f.read(task.length)
    except OSError as e:
        raise DataError(f"cannot read input file {task.path}: {e.strerror}") from None
    out = []
    for i, line in enumerate(data.split(b"\n")):
        if not line.strip():
            continue
        where = f"{task.path} line {task.first_line + i}"
        try:
            out.append((where, json.loads(line)))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(f"{where} is not valid JSON; fix or remove that line") from None
    return out


def read_task(task: Task, text_field: str = "text", *, metadata: bool = False) -> Iterator[Record]:
    """The documents of any task, in order (a text file is one document, its id the path)."""
    if task.kind == "text":
        text, _ = read_text_file(task.path)
        yield Record(text, task.path)
    else:
        yield from read_jsonl_records(task, text_field, metadata=metadata)
