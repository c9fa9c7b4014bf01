"""Tokenise text files and JSONL into a prepared dataset (see `llama3hp.data.shards` for the layout).

One document is one text file or one JSONL line (its `text_field` string); each is stored as
`<|begin_of_text|> + tokens + <|end_of_text|>`. Empty documents are skipped (and counted).

Work is split into tasks (a text file, or a ~4 MB block of whole JSONL lines) tokenised by a
process pool; results come back in task order (`Pool.imap`), so the output bytes do not depend
on the number of workers. Directories are walked recursively in sorted order, skipping hidden
entries; explicitly named inputs keep the order given.

    python -m llama3hp.data.prepare INPUT... --out DIR [--workers 2] [--stdlib]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llama3hp.data.errors import DataError
from llama3hp.data.shards import (
    DEFAULT_SHARD_TOKENS,
    ShardWriter,
    build_manifest,
    commit_dir,
    make_temp_dir,
    write_json_atomic,
)
from llama3hp.data.tokenizer import Tokenizer

__all__ = ["prepare", "default_corpus_files", "CorpusFiles", "DEFAULT_EXTENSIONS"]

log = logging.getLogger(__name__)

DEFAULT_EXTENSIONS = (".py", ".txt", ".md", ".rst")
JSONL_BLOCK_BYTES = 4 << 20  # big enough to amortise task overhead, small enough to balance 2 workers

_worker_tok: Tokenizer | None = None  # per worker process, set by _init_worker
_task_field = "text"


class CorpusFiles(list):
    """A sorted list of Paths that also says how many candidates were skipped (`n_skipped`)."""

    n_skipped: int = 0


def default_corpus_files() -> CorpusFiles:
    """The running interpreter's standard-library `.py` sources, sorted: real text on every machine.

    Excludes site-packages / dist-packages and files that are not valid UTF-8 (skipped, counted in
    `.n_skipped`).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = CorpusFiles()
    skipped = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")
        )
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            p = Path(dirpath) / name
            try:
                p.read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                skipped += 1
                continue
            files.append(p)
    files.sort()
    files.n_skipped = skipped
    if skipped:
        log.info("default_corpus_files: skipped %d unreadable or non-UTF-8 files", skipped)
    return files


def _walk(directory: Path, extensions: tuple[str, ...]) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and name.endswith(extensions):
                found.append(Path(dirpath) / name)
    return sorted(found)


def _expand_inputs(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike, extensions: tuple[str, ...]
) -> list[Path]:
    if isinstance(inputs, str | os.PathLike):
        inputs = [inputs]
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files.extend(_walk(p, extensions))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"input {p} does not exist; pass existing files or directories")
    if not files:
        raise DataError(
            f"empty input: no files with extensions {' '.join(extensions)} or .jsonl in {list(map(str, inputs))}"
        )
    return files


def _jsonl_blocks(path: Path, index: int) -> tuple[list[tuple], str]:
    """Tasks covering whole lines of a JSONL file, plus the file's sha256."""
    h = hashlib.sha256()
    tasks = []
    offset, line_no, carry = 0, 1, b""
    try:
        with open(path, "rb") as f:
            while True:
                block = f.read(JSONL_BLOCK_BYTES)
                h.update(block)
                data = carry + block
                if not block:
                    if data:
                        tasks.append(("jsonl", index, str(path), offset, len(data), line_no))
                    break
                cut = data.rfind(b"\n") + 1
                if cut == 0:
                    carry = data
                    continue
                tasks.append(("jsonl", index, str(path), offset, cut, line_no))
                line_no += data.count(b"\n", 0, cut)
                offset += cut
                carry = data[cut:]
    except OSError as e:
        raise DataError(f"cannot read input file {path}: {e.strerror}") from None
    return tasks, h.hexdigest()


def _encode_docs(texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    tok = _worker_tok
    assert tok is not None
    parts, lens, empty = [], [], 0
    for text in texts:
        if not text:
            empty += 1
            continue
        ids = tok.encode(text, bos=True, eos=True)
        parts.append(np.asarray(ids, dtype=np.uint32))
        lens.append(len(ids))
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)
    return tokens, np.asarray(lens, dtype=np.int64), empty


def _run_task(task: tuple) -> tuple[int, np.ndarray, np.ndarray, int, str | None]:
    kind, index, path = task[0], task[1], task[2]
    if kind == "text":
        try:
            raw = Path(path).read_bytes()
        except OSError as e:
            raise DataError(f"cannot read input file {path}: {e.strerror}") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"input file {path} is not valid UTF-8 (byte {e.start}); convert it or leave it out"
            ) from None
        tokens, lens, empty = _encode_docs([text])
        return index, tokens, lens, empty, hashlib.sha256(raw).hexdigest()
    _, _, _, offset, length, first_line = task
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    texts = []
    field = _task_field
    for i, line in enumerate(data.split(b"\n")):
        if not line.strip():
            continue
        where = f"{path} line {first_line + i}"
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DataError(f"{where} is not valid JSON; fix or remove that line") from None
        if not isinstance(obj, dict) or field not in obj:
            raise DataError(f"{where} has no '{field}' field; set text_field to the field holding the text")
        if not isinstance(obj[field], str):
            raise DataError(f"{where} field '{field}' is {type(obj[field]).__name__}, not a string")
        texts.append(obj[field])
    tokens, lens, empty = _encode_docs(texts)
    return index, tokens, lens, empty, None


def _init_worker(tokenizer_path: str | None, text_field: str) -> None:
    global _worker_tok, _task_field
    _worker_tok = Tokenizer.load(tokenizer_path)
    _task_field = text_field


def prepare(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer_path: str | os.PathLike | None = None,
    text_field: str = "text",
    workers: int = 2,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Tokenise `inputs` (files, directories, .jsonl) into `out_dir`; returns the manifest dict."""
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    exts = tuple(sorted({e if e.startswith(".") else "." + e for e in extensions}))
    files = _expand_inputs(inputs, exts)
    tok = Tokenizer.load(tokenizer_path)
    tok_arg = None if tokenizer_path is None else str(tokenizer_path)

    tasks: list[tuple] = []
    input_sha: dict[int, str] = {}
    for i, f in enumerate(files):
        if f.suffix == ".jsonl":
            blocks, sha = _jsonl_blocks(f, i)
            tasks.extend(blocks)
            input_sha[i] = sha
        else:
            tasks.append(("text", i, str(f)))

    out = Path(out_dir)
    tmp = make_temp_dir(out, overwrite)
    try:
        writer = ShardWriter(tmp, shard_tokens)
        per_input = [{"path": str(f), "n_docs": 0, "n_tokens": 0} for f in files]
        skipped_empty = 0
        for index, tokens, lens, empty, sha in _results(tasks, tok_arg, text_field, workers):
            writer.add(tokens, lens)
            per_input[index]["n_docs"] += int(lens.size)
            per_input[index]["n_tokens"] += int(tokens.size)
            skipped_empty += empty
            if sha is not None:
                input_sha[index] = sha
        shards = writer.finish()
        if not shards:
            raise DataError(
                f"empty input: all {len(files)} input file(s) hold no text; give non-empty documents"
            )
        for i, entry in enumerate(per_input):
            entry["sha256"] = input_sha[i]
        manifest = build_manifest(
            shards,
            tokenizer={
                "sha256": tok.sha256,
                "vocab_size": tok.n_words,
                "bos_id": tok.bos_id,
                "eos_id": tok.eos_id,
            },
            inputs=per_input,
            # `workers` is left out on purpose: it does not change a single output byte.
            settings={"text_field": text_field, "shard_tokens": int(shard_tokens), "extensions": list(exts)},
            extra={"skipped_empty_docs": skipped_empty},
        )
        write_json_atomic(tmp / "manifest.json", manifest)
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _results(tasks: list[tuple], tok_arg: str | None, text_field: str, workers: int) -> Iterator[tuple]:
    if workers == 1 or len(tasks) < 2:
        _init_worker(tok_arg, text_field)
        yield from map(_run_task, tasks)
        return
    # fork: workers inherit the already-loaded tokenizer (spawn would re-import torch and reload it).
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    chunk = max(1, min(16, len(tasks) // (8 * workers)))
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tok_arg, text_field)) as pool:
        yield from pool.imap(_run_task, tasks, chunksize=chunk)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llama3hp.data.prepare", description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="*", help="text files, directories, .jsonl files")
    ap.add_argument("--out", required=True, help="output dataset directory")
    ap.add_argument("--stdlib", action="store_true", help="add the Python standard library sources")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.model path (default: packaged Llama 3)")
    ap.add_argument("--text-field", default="text")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    inputs = list(args.inputs) + (list(default_corpus_files()) if args.stdlib else [])
    t0 = time.perf_counter()
    try:
        m = prepare(
            inputs,
            args.out,
            tokenizer_path=args.tokenizer,
            text_field=args.text_field,
            workers=args.workers,
            shard_tokens=args.shard_tokens,
            overwrite=args.overwrite,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    print(
        f"{m['n_docs']} docs, {m['n_tokens']} tokens, {len(m['shards'])} shard(s) -> {args.out} in {dt:.1f}s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
