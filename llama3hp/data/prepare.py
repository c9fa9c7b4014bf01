"""Tokenise text files and JSONL into a prepared dataset (see `llama3hp.data.shards` for the layout).

One document is one text file or one JSONL line (its `text_field` string; see
`llama3hp.data.readers`); each is stored as `<|begin_of_text|> + tokens + <|end_of_text|>`.
Empty documents are skipped (and counted). With `format="sft"` or `"preference"` the inputs are
JSONL rows of conversations or preference pairs in the Llama 3 chat format (`llama3hp.data.chat`):
one document per row, each token stored with its role, and for preferences the pair index.

Work is split into tasks (a text file, or a ~4 MB block of whole JSONL lines) tokenised by a
process pool; results come back in task order, so the output bytes do not depend on the number
of workers. Directories are walked recursively in sorted order for the text extensions and
.jsonl, skipping hidden entries; explicitly named inputs keep the order given.

    python -m llama3hp.data.prepare INPUT... --out DIR [--workers 2] [--stdlib] [--format sft]
"""

from __future__ import annotations

import argparse
import hashlib
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

from llama3hp.data.chat import encode_preference, encode_sft
from llama3hp.data.errors import DataError
from llama3hp.data.readers import (
    DEFAULT_EXTENSIONS,
    Task,
    expand_inputs,
    jsonl_blocks,
    read_jsonl_objects,
    read_jsonl_records,
    read_text_file,
)
from llama3hp.data.shards import (
    DEFAULT_SHARD_TOKENS,
    ShardWriter,
    build_manifest,
    commit_dir,
    make_temp_dir,
    write_json_atomic,
)
from llama3hp.data.tokenizer import ChatFormat, Tokenizer

__all__ = ["prepare", "default_corpus_files", "CorpusFiles", "DEFAULT_EXTENSIONS", "FORMATS"]

FORMATS = ("text", "sft", "preference")

log = logging.getLogger(__name__)


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


def _encode_chat_task(tok: Tokenizer, task: Task, fmt: str) -> tuple[np.ndarray, ...]:
    """(tokens uint32, doc lengths int64, roles uint8, pair rows int64 [n, 4] with sample id -1)."""
    if task.kind != "jsonl":
        raise DataError(f"input {task.path} is not JSONL: --format {fmt} reads .jsonl rows")
    chat = ChatFormat(tok)
    ids: list[int] = []
    roles: list[int] = []
    lens, pairs = [], []
    for where, row in read_jsonl_objects(task):
        if fmt == "sft":
            t = encode_sft(chat, row, where)
            ids += t.ids
            roles += t.roles
            lens.append(len(t))
            continue
        p = encode_preference(chat, row, where)
        parts = [p.prompt, p.chosen, p.rejected] + ([p.edited] if p.edited is not None else [])
        for part in parts:
            ids += part.ids
            roles += part.roles
        lens.append(sum(len(part) for part in parts))
        pairs.append([-1, len(p.prompt), len(p.chosen), len(p.rejected)])
    return (
        np.asarray(ids, dtype=np.uint32), np.asarray(lens, dtype=np.int64), np.asarray(roles, dtype=np.uint8),
        np.asarray(pairs, dtype=np.int64).reshape(-1, 4),
    )  # fmt: skip


def _encode_task(
    tok: Tokenizer, task: Task, text_field: str
) -> tuple[np.ndarray, np.ndarray, int, str | None]:
    """(tokens uint32, doc lengths int64, empty docs skipped, sha256 of a text file or None)."""
    if task.kind == "text":
        text, raw = read_text_file(task.path)
        texts, sha = [text], hashlib.sha256(raw).hexdigest()
    else:
        texts, sha = [r.text for r in read_jsonl_records(task, text_field)], None
    parts, lens, empty = [], [], 0
    for text in texts:
        if not text:
            empty += 1
            continue
        ids = np.array(tok.encode(text, bos=True, eos=True), dtype=np.uint32)
        parts.append(ids)
        lens.append(ids.size)
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)
    return tokens, np.asarray(lens, dtype=np.int64), empty, sha


_worker: tuple[Tokenizer, str, str] | None = None  # (tokenizer, text field, format) of a pool process


def _init_worker(tok: Tokenizer, text_field: str, fmt: str = "text") -> None:
    global _worker
    _worker = (tok, text_field, fmt)


def _run_task(task: Task) -> tuple:
    assert _worker is not None
    tok, text_field, fmt = _worker
    if fmt != "text":
        return (task.index, *_encode_chat_task(tok, task, fmt))
    return (task.index, *_encode_task(tok, task, text_field))


def _results(
    tasks: list[Task], tok: Tokenizer, text_field: str, workers: int, fmt: str = "text"
) -> Iterator[tuple]:
    """Encoded tasks in task order, from `workers` processes.

    Processes, not threads: tiktoken 0.14 holds the GIL while it encodes (two threads measured no
    faster than one on the stdlib corpus). fork lets workers inherit the loaded tokenizer.
    """
    _init_worker(tok, text_field, fmt)
    if workers == 1 or len(tasks) < 2:
        yield from map(_run_task, tasks)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    chunk = max(1, min(16, len(tasks) // (8 * workers)))
    with mp.get_context(method).Pool(
        workers, initializer=_init_worker, initargs=(tok, text_field, fmt)
    ) as pool:
        yield from pool.imap(_run_task, tasks, chunksize=chunk)


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
    format: str = "text",
) -> dict[str, Any]:
    """Tokenise `inputs` (files, directories, .jsonl) into `out_dir`; returns the manifest dict.
    format: "text" (pre-training documents), "sft" or "preference" (JSONL rows, module docstring)."""
    if workers < 1:
        raise DataError(f"workers must be >= 1, got {workers}")
    if format not in FORMATS:
        raise DataError(f"unknown format {format!r}: use one of {', '.join(FORMATS)}")
    kind = "pretrain" if format == "text" else format
    exts = tuple(sorted({e if e.startswith(".") else "." + e for e in extensions}))
    files = expand_inputs(inputs, exts, walk_jsonl=True)
    tok = Tokenizer.load(tokenizer_path)

    tasks: list[Task] = []
    input_sha: dict[int, str] = {}
    for i, f in enumerate(files):
        if f.suffix == ".jsonl":
            blocks, sha = jsonl_blocks(f, i)
            tasks.extend(blocks)
            input_sha[i] = sha
        else:
            tasks.append(Task("text", i, str(f)))

    out = Path(out_dir)
    tmp = make_temp_dir(out, overwrite)
    try:
        writer = ShardWriter(tmp, shard_tokens, kind)
        per_input = [{"path": str(f), "n_docs": 0, "n_tokens": 0} for f in files]
        skipped_empty = 0
        for index, tokens, lens, *rest in _results(tasks, tok, text_field, workers, format):
            if kind == "pretrain":
                empty, sha = rest
                writer.add(tokens, lens)
                skipped_empty += empty
                if sha is not None:
                    input_sha[index] = sha
            else:
                roles, pairs = rest
                pairs[:, 0] = writer.n_docs + np.arange(len(pairs))  # sample id: the pair's document
                writer.add(tokens, lens, roles, pairs if kind == "preference" else None)
            per_input[index]["n_docs"] += int(lens.size)
            per_input[index]["n_tokens"] += int(tokens.size)
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
            kind=kind,
        )
        write_json_atomic(tmp / "manifest.json", manifest)
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


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
