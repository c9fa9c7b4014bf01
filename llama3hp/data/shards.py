"""Prepared token datasets on disk: writing them and opening them memory-mapped.

Layout of a prepared dataset directory (format `llama3hp-tokens`, version 2; version 1, the same
without `kind` and the post-training files, still loads):

- `shard_00000.bin`, ...: flat little-endian uint32 token ids of whole documents, back to back.
- `shard_00000.idx`, ...: little-endian int64 document offsets into that shard, n_docs + 1 values
  (0 first, the shard's token count last). Documents never straddle shards.
- post-training datasets (`kind` "sft" or "preference", `llama3hp.data.chat`) also have
  `shard_00000.role` (one uint8 role a token: 0 context, 1 response, 2 formatting inside a
  response) and, for preferences, `shard_00000.pair` (int64 [n_docs, 4] per pair: sample id, and
  the lengths of its prompt, chosen and rejected parts; a document is the pair's
  [prompt | chosen | rejected | edited] tokens, the edited part being what is left).
- `manifest.json`: format, version and kind, token and document counts, every shard with its token
  and document counts and the sha256 of its files, the tokenizer (sha256, vocabulary size, bos/eos
  ids), the per-input sha256 and counts, and the settings used.

A dataset is written into a temporary sibling directory that is renamed into place only once the
manifest is complete, so a crash never leaves a half-written dataset behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from llama3hp.data.errors import DataError

__all__ = ["TokenDataset", "ShardWriter", "write_token_dataset", "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "llama3hp-tokens"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
KINDS = ("pretrain", "sft", "preference")
TOKEN_DTYPE = np.dtype("<u4")
INDEX_DTYPE = np.dtype("<i8")
ROLE_DTYPE = np.dtype("u1")
PAIR_DTYPE = np.dtype("<i8")
PAIR_COLUMNS = 4  # sample id, prompt, chosen and rejected lengths
DEFAULT_SHARD_TOKENS = 1 << 28  # 1 GiB of uint32 per shard: few files, each still easy to copy and hash
_HASH_BLOCK = 1 << 24


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """Appends documents to shards inside `directory`; `finish()` returns the manifest's shard list.

    A shard is closed as soon as it holds at least `shard_tokens` tokens, so a shard may exceed the
    target by up to one document (documents are never split across shards).
    """

    def __init__(self, directory: Path, shard_tokens: int = DEFAULT_SHARD_TOKENS, kind: str = "pretrain"):
        if shard_tokens < 1:
            raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.directory = Path(directory)
        self.shard_tokens = int(shard_tokens)
        self.kind = kind
        self._roles: list[np.ndarray] = []  # the open shard's per-token roles and pair rows
        self._pairs: list[np.ndarray] = []
        self.shards: list[dict[str, Any]] = []
        self.n_tokens = 0
        self.n_docs = 0
        self._file: BinaryIO | None = None
        self._hash: Any = None  # hashlib.sha256() of the open shard
        self._offsets: list[int] = [0]

    def _open(self) -> None:
        name = f"shard_{len(self.shards):05d}.bin"
        self._file = open(self.directory / name, "wb")
        self._hash = hashlib.sha256()
        self._offsets = [0]

    def _close(self) -> None:
        assert self._file is not None and self._hash is not None
        self._file.close()
        i = len(self.shards)
        idx = np.asarray(self._offsets, dtype=INDEX_DTYPE).tobytes()
        (self.directory / f"shard_{i:05d}.idx").write_bytes(idx)
        entry = {
            "tokens": f"shard_{i:05d}.bin",
            "index": f"shard_{i:05d}.idx",
            "n_tokens": self._offsets[-1],
            "n_docs": len(self._offsets) - 1,
            "sha256": self._hash.hexdigest(),
            "index_sha256": hashlib.sha256(idx).hexdigest(),
        }
        extras = []
        if self.kind != "pretrain":
            extras.append(("roles", "role", np.concatenate(self._roles).astype(ROLE_DTYPE)))
        if self.kind == "preference":
            extras.append(("pairs", "pair", np.concatenate(self._pairs).astype(PAIR_DTYPE)))
        for key, suffix, arr in extras:
            data = arr.tobytes()
            (self.directory / f"shard_{i:05d}.{suffix}").write_bytes(data)
            entry[key], entry[f"{key}_sha256"] = f"shard_{i:05d}.{suffix}", hashlib.sha256(data).hexdigest()
        self._roles, self._pairs = [], []
        self.shards.append(entry)
        self._file = None
        self._hash = None

    def add(
        self,
        tokens: np.ndarray,
        doc_lens: np.ndarray,
        roles: np.ndarray | None = None,
        pairs: np.ndarray | None = None,
    ) -> None:
        """Append documents given back to back: tokens uint32 [sum(doc_lens)], doc_lens int [n_docs];
        for a post-training kind also roles uint8 [sum(doc_lens)] and (preference) pairs int64
        [n_docs, 4]."""
        tokens = np.ascontiguousarray(tokens, dtype=TOKEN_DTYPE)
        doc_lens = np.asarray(doc_lens, dtype=np.int64)
        if int(doc_lens.sum()) != tokens.size:
            raise DataError(
                f"document lengths sum to {int(doc_lens.sum())} but {tokens.size} tokens were given"
            )
        if (roles is None) != (self.kind == "pretrain") or (pairs is None) != (self.kind != "preference"):
            raise ValueError(
                f"a {self.kind} dataset takes roles with sft/preference and pairs with preference"
            )
        pos, d = 0, 0
        while d < doc_lens.size:
            if self._file is None:
                self._open()
            room = self.shard_tokens - self._offsets[-1]
            cum = np.cumsum(doc_lens[d:])
            # Take documents up to and including the one that fills the shard.
            k = int(np.searchsorted(cum, room, side="left")) + 1
            k = min(k, doc_lens.size - d)
            n = int(cum[k - 1])
            chunk = tokens[pos : pos + n]
            assert self._file is not None  # opened above
            self._file.write(chunk.tobytes())
            self._hash.update(chunk.tobytes())
            if roles is not None:
                self._roles.append(np.asarray(roles[pos : pos + n]))
            if pairs is not None:
                self._pairs.append(np.asarray(pairs[d : d + k]).reshape(-1, PAIR_COLUMNS))
            base = self._offsets[-1]
            self._offsets.extend((base + cum[:k]).tolist())
            self.n_tokens += n
            self.n_docs += k
            pos += n
            d += k
            if self._offsets[-1] >= self.shard_tokens:
                self._close()

    def finish(self) -> list[dict[str, Any]]:
        if self._file is not None:
            self._close()
        return self.shards


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_temp_dirs(out_dir: Path) -> None:
    """Remove `.NAME.tmp-PID` / `.NAME.old-PID` siblings of `out_dir` left by a killed writer (its
    PID no longer runs); a writer that is still running keeps its own."""
    if not out_dir.parent.is_dir():
        return
    for kind in ("tmp", "old"):
        for p in out_dir.parent.glob(f".{out_dir.name}.{kind}-*"):
            pid = p.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)


def make_temp_dir(out_dir: Path, overwrite: bool) -> Path:
    """An empty temporary sibling of `out_dir` (same filesystem, so the final rename is atomic)."""
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(
            f"output directory {out_dir} already exists and is not empty; pass --overwrite "
            "(overwrite=True in Python) or pick another"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished `tmp` into place; an old `out_dir` (overwrite) is moved aside, then deleted."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_manifest(
    shards: list[dict[str, Any]],
    *,
    tokenizer: dict[str, Any],
    inputs: list[dict[str, Any]] | None = None,
    settings: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    kind: str = "pretrain",
) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "kind": kind,
        "dtype": "uint32-le",
        "n_tokens": sum(s["n_tokens"] for s in shards),
        "n_docs": sum(s["n_docs"] for s in shards),
        "shards": shards,
        "tokenizer": tokenizer,
        "inputs": inputs or [],
        "settings": settings or {},
        **(extra or {}),
    }


def write_token_dataset(
    docs: Iterable[np.ndarray],
    out_dir: str | os.PathLike,
    *,
    tokenizer_sha256: str,
    vocab_size: int,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write already-tokenised documents (each a 1-D int array of ids) as a prepared dataset.

    For synthetic data and tests; `prepare()` is the path from text. Returns the manifest.
    """
    out = Path(out_dir)
    tmp = make_temp_dir(out, overwrite)
    try:
        writer = ShardWriter(tmp, shard_tokens)
        for doc in docs:
            arr = np.asarray(doc)
            if arr.ndim != 1 or arr.size == 0:
                raise DataError("every document must be a non-empty 1-D array of token ids")
            if arr.min() < 0 or arr.max() >= 2**32:
                raise DataError("token ids must fit in uint32")
            writer.add(arr.astype(TOKEN_DTYPE), np.array([arr.size]))
        shards = writer.finish()
        if not shards:
            raise DataError(f"no documents to write to {out}; give at least one")
        manifest = build_manifest(
            shards,
            tokenizer={"sha256": tokenizer_sha256, "vocab_size": int(vocab_size)},
            settings={"shard_tokens": int(shard_tokens)},
        )
        write_json_atomic(tmp / "manifest.json", manifest)
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


class TokenDataset:
    """A prepared dataset opened read-only: shards memory-mapped, never read into RAM.

    Attributes: `n_docs`, `n_tokens`, `doc_lens` int64 [n_docs] (documents numbered across shards in
    manifest order), `vocab_size`, `tokenizer_sha256`, `manifest`, `kind` ("pretrain", "sft",
    "preference"), and for preferences `pairs` int64 [n_docs, 4] (sample id, prompt, chosen and
    rejected lengths).
    """

    def __init__(self, path: str | os.PathLike, *, tokenizer_sha256: str | None = None, verify: bool = False):
        self.path = Path(path)
        mpath = self.path / "manifest.json"
        if not mpath.is_file():
            raise DataError(
                f"no manifest.json in {self.path}: not a prepared dataset; run llama3hp.data.prepare on it first"
            )
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"manifest {mpath} is not valid JSON ({e}); re-run prepare") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise DataError(f"manifest {mpath} is not a {FORMAT_NAME} manifest; re-run prepare")
        if manifest.get("version") not in READABLE_VERSIONS:
            raise DataError(
                f"manifest {mpath} has format version {manifest.get('version')!r}, this code reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}; re-run prepare with this llama3hp"
            )
        self.manifest = manifest
        self.kind: str = manifest.get("kind", "pretrain")
        if self.kind not in KINDS:
            raise DataError(
                f"manifest {mpath} has kind {self.kind!r}, expected one of {', '.join(KINDS)}; re-run prepare"
            )
        self._roles: list[np.memmap] = []
        pairs: list[np.ndarray] = []
        self.tokenizer_sha256: str = manifest["tokenizer"]["sha256"]
        self.vocab_size: int = int(manifest["tokenizer"]["vocab_size"])
        if tokenizer_sha256 is not None and tokenizer_sha256 != self.tokenizer_sha256:
            raise DataError(
                f"dataset {self.path} was prepared with tokenizer sha256 {self.tokenizer_sha256[:16]}... but this run "
                f"uses {tokenizer_sha256[:16]}...; re-run prepare with this tokenizer or set tokenizer_path to the one used"
            )
        self._tokens: list[np.memmap] = []
        self._corrupt_next = False
        lens, shard_of, start_in_shard = [], [], []
        for i, shard in enumerate(manifest["shards"]):
            tpath, ipath = self.path / shard["tokens"], self.path / shard["index"]
            n_tok, n_doc = int(shard["n_tokens"]), int(shard["n_docs"])
            files = [
                (tpath, n_tok * TOKEN_DTYPE.itemsize, "sha256"),
                (ipath, (n_doc + 1) * INDEX_DTYPE.itemsize, "index_sha256"),
            ]
            if self.kind != "pretrain":
                files.append((self.path / shard["roles"], n_tok * ROLE_DTYPE.itemsize, "roles_sha256"))
            if self.kind == "preference":
                files.append(
                    (self.path / shard["pairs"], n_doc * PAIR_COLUMNS * PAIR_DTYPE.itemsize, "pairs_sha256")
                )
            for p, want, _ in files:
                if not p.is_file():
                    raise DataError(f"shard file {p} is missing; re-run prepare or restore the dataset")
                size = p.stat().st_size
                if size != want:
                    raise DataError(
                        f"shard file {p} has {size} bytes but the manifest declares {want} "
                        f"(truncated or corrupt); re-run prepare or restore the file"
                    )
            if verify:
                for p, _, key in files:
                    got = file_sha256(p)
                    if got != shard[key]:
                        raise DataError(
                            f"checksum mismatch in {p}: sha256 {got[:16]}... but the manifest says "
                            f"{shard[key][:16]}... (corrupt file); re-run prepare or restore the file"
                        )
            offsets = np.fromfile(ipath, dtype=INDEX_DTYPE)
            d = np.diff(offsets)
            if offsets[0] != 0 or offsets[-1] != n_tok or (d.size and d.min() <= 0):
                raise DataError(f"document index {ipath} is inconsistent with its shard; re-run prepare")
            self._tokens.append(np.memmap(tpath, dtype=TOKEN_DTYPE, mode="r", shape=(n_tok,)))
            if self.kind != "pretrain":
                self._roles.append(np.memmap(files[2][0], dtype=ROLE_DTYPE, mode="r", shape=(n_tok,)))
            if self.kind == "preference":
                pairs.append(np.fromfile(files[3][0], dtype=PAIR_DTYPE).reshape(n_doc, PAIR_COLUMNS))
            lens.append(d)
            shard_of.append(np.full(n_doc, i, dtype=np.int32))
            start_in_shard.append(offsets[:-1])
        if not lens:
            raise DataError(f"dataset {self.path} has no shards; re-run prepare on non-empty input")
        self.doc_lens: np.ndarray = np.concatenate(lens).astype(np.int64)
        self._doc_shard = np.concatenate(shard_of)
        self._doc_start = np.concatenate(start_in_shard).astype(np.int64)
        self.n_docs = int(self.doc_lens.size)
        self.n_tokens = int(self.doc_lens.sum())
        self.pairs: np.ndarray | None = np.concatenate(pairs) if pairs else None
        if self.pairs is not None and bool((self.pairs[:, 1:].sum(1) > self.doc_lens).any()):
            raise DataError(f"pair index of {self.path} disagrees with its documents; re-run prepare")
        if self.n_tokens != int(manifest["n_tokens"]) or self.n_docs != int(manifest["n_docs"]):
            raise DataError(f"manifest {mpath} totals disagree with its shards; re-run prepare")

    def doc_tokens(self, doc: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Tokens [start, stop) of document `doc` as a read-only uint32 view of the memory map."""
        if not 0 <= doc < self.n_docs:
            raise IndexError(f"document {doc} out of range [0, {self.n_docs})")
        n = int(self.doc_lens[doc])
        stop = n if stop is None else stop
        if not 0 <= start <= stop <= n:
            raise IndexError(f"span [{start}, {stop}) out of range for document {doc} of length {n}")
        base = int(self._doc_start[doc])
        shard = int(self._doc_shard[doc])
        if self._corrupt_next:  # fault injection (llama3hp.train.faults): a flipped high byte
            self._corrupt(shard, base + start)
        span = self._tokens[shard][base + start : base + stop]
        # Every token read is range-checked: one max over the span the loader copies anyway.
        if span.size and int(span.max()) >= self.vocab_size:
            bad = base + start + int(np.argmax(span >= self.vocab_size))
            shard_file = self.path / self.manifest["shards"][shard]["tokens"]
            raise DataError(
                f"token id {int(self._tokens[shard][bad])} >= vocabulary size {self.vocab_size} in {shard_file} "
                f"at token {bad} (byte offset {bad * TOKEN_DTYPE.itemsize}): the shard is corrupt; "
                "re-run prepare or restore it (data.verify_checksums=true checks every shard at start)"
            )
        return span

    def corrupt_next_read(self) -> None:
        """Fault injection: the next `doc_tokens` call first sets the high byte of its first token in a
        private copy-on-write map of the shard (the file on disk is never written)."""
        self._corrupt_next = True

    def _corrupt(self, shard: int, token: int) -> None:
        self._corrupt_next = False
        mm = self._tokens[shard]
        if mm.mode != "c":
            mm = np.memmap(str(mm.filename), dtype=TOKEN_DTYPE, mode="c", shape=mm.shape)
            self._tokens[shard] = mm
        mm[token] |= np.uint32(0xFF000000)

    def doc_roles(self, doc: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Roles uint8 [stop - start] of a post-training document's tokens (`llama3hp.data.chat`)."""
        if not self._roles:
            raise DataError(
                f"dataset {self.path} is a {self.kind} dataset without token roles; prepare it with --format sft|preference"
            )
        base = int(self._doc_start[doc])
        stop = int(self.doc_lens[doc]) if stop is None else stop
        return self._roles[int(self._doc_shard[doc])][base + start : base + stop]

    def __len__(self) -> int:
        return self.n_docs

    def __repr__(self) -> str:
        return f"TokenDataset({str(self.path)!r}, n_docs={self.n_docs}, n_tokens={self.n_tokens})"
