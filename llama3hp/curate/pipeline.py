"""`curate(inputs, out_dir, cfg)`: the streaming, multi-core curation pipeline in front of `prepare`.

Inputs are read by `llama3hp.data.readers` (text files, JSONL with `text` and optional `url` and
`id`), cut into shards of about `shard_mb` of whole files or JSONL lines. Three passes over the
shards run in a process pool; the global decisions between them run in the main process:

1. scan (pool): per shard, each document's bytes, URL key, content hash, MinHash signature (C++),
   its LSH bands sorted per band, and its line hashes, spilled to the work folder.
2. dedup (main): URL, then exact, then MinHash (a block-wise merge of the spilled band runs, so
   memory is bounded by the block and one shard's signatures, not the corpus), then the lines
   seen more than `max_count` times in each bucket of `bucket_docs` surviving documents.
3. clean (pool): survivors lose their over-counted lines, then the heuristic filters run; with
   the KL filter on, each survivor's Llama 3 token histogram is kept and the corpus's summed.
4. write (pool): the KL filter against the corpus distribution, then the output shards.

Output folder: `shard_00000.jsonl` ... (one JSON object a line: `text`, `id`, `url` when the
input had one) that `llama3hp prepare` reads, `report.json` (see `report.py`) and
`removed.ndjson` (one line per removed document: id, stage, reason, value or duplicate_of).

Determinism: every decision depends on the input order only (the first document of a group is
kept), results are gathered in shard order, so the same input and config give the same bytes
whatever the number of workers. Resume: each shard's pass results are written to a temporary
name and renamed; a run with the same inputs and config (the fingerprint in the work folder
`.<out>.curate-work/`) skips the shards already done. The output folder appears in one rename
when everything is done.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llama3hp.curate import dedup, filters, minhash
from llama3hp.curate.config import CurateConfig, config_to_dict
from llama3hp.curate.report import Removal, StageCount, build_report
from llama3hp.data.errors import DataError
from llama3hp.data.readers import Record, Task, expand_inputs, jsonl_blocks, read_task
from llama3hp.data.shards import commit_dir, write_json_atomic

__all__ = ["curate", "plan_shards"]

WORK_VERSION = 1
SNIPPET_CHARS = 240
STAGES = ("url", "exact", "minhash", "lines", "filters", "token_kl")
_REMOVED_BY = {1: "url", 2: "exact", 3: "minhash"}


# ---------------------------------------------------------------- shards and the work folder


def plan_shards(files: list[Path], shard_bytes: int) -> list[list[Task]]:
    """Consecutive read tasks grouped into shards of about `shard_bytes` (never splitting a task)."""
    tasks: list[tuple[Task, int]] = []
    for i, f in enumerate(files):
        if f.suffix == ".jsonl":
            tasks += [(t, t.length) for t in jsonl_blocks(f, i, block_bytes=max(1 << 16, shard_bytes))[0]]
        else:
            try:
                size = f.stat().st_size
            except OSError as e:
                raise DataError(f"cannot read input file {f}: {e.strerror}") from None
            tasks.append((Task("text", i, str(f)), size))
    shards: list[list[Task]] = [[]]
    size = 0
    for task, n in tasks:
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(task)
        size += n
    return [s for s in shards if s]


def _fingerprint(cfg: CurateConfig, shards: list[list[Task]]) -> str:
    h = hashlib.sha256(json.dumps([WORK_VERSION, config_to_dict(cfg)], sort_keys=True).encode())
    for shard in shards:
        for t in shard:
            st = os.stat(t.path)
            h.update(f"{t.path}|{t.offset}|{t.length}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _prepare_work(out: Path, fingerprint: str, overwrite: bool) -> Path:
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise DataError(
            f"output directory {out} already exists and is not empty; pass --overwrite or pick another"
        )
    work = out.parent / f".{out.name}.curate-work"
    stamp = work / "fingerprint"
    if work.exists() and (not stamp.is_file() or stamp.read_text() != fingerprint):
        shutil.rmtree(work)  # another input or config: nothing there can be reused
    for sub in ("scan", "clean", "final"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    stamp.with_suffix(".tmp").write_text(fingerprint)
    os.replace(stamp.with_suffix(".tmp"), stamp)
    return work


def _save_dir(target: Path, write: Callable[[Path], None]) -> None:
    """Write a shard's files into a temporary folder, then rename it to `target` (the done marker)."""
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    write(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _read_shard(shard: list[Task], cfg: CurateConfig) -> Iterator[Record]:
    for task in shard:
        yield from read_task(task, cfg.text_field, metadata=True)


# ---------------------------------------------------------------- pool


_state: dict[str, Any] = {}  # per worker process: config, work folder, lazily loaded helpers


def _init(cfg: CurateConfig, work: Path) -> None:
    _state.clear()
    _state.update(cfg=cfg, work=work)


def _tokenizer():
    if "tok" not in _state:
        from llama3hp.data.tokenizer import Tokenizer

        _state["tok"] = Tokenizer.load(_state["cfg"].filters.tokenizer)
    return _state["tok"]


def _pool_map(fn: Callable, items: list, cfg: CurateConfig, work: Path, desc: str, progress: bool) -> list:
    """fn over items in shard order: in this process for one worker, else a fork pool."""
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc=f"curate {desc}", unit="shard", leave=False)
    results = []
    _init(cfg, work)
    try:
        if cfg.workers == 1 or len(items) < 2:
            it: Iterator = map(fn, items)
        else:
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            pool = mp.get_context(method).Pool(
                min(cfg.workers, len(items)), initializer=_init, initargs=(cfg, work)
            )
            it = pool.imap(fn, items)
        for r in it:
            results.append(r)
            if bar is not None:
                bar.update(1)
        if cfg.workers > 1 and len(items) >= 2:
            pool.close()
            pool.join()
    finally:
        if bar is not None:
            bar.close()
        if cfg.workers > 1 and len(items) >= 2:
            pool.terminate()
    return results


# ---------------------------------------------------------------- pass 1: scan


def _scan(job: tuple[int, list[Task]]) -> int:
    s, shard = job
    cfg: CurateConfig = _state["cfg"]
    target = _state["work"] / "scan" / f"{s:05d}"
    if target.is_dir():
        return int(np.load(target / "nbytes.npy").size)
    records = list(_read_shard(shard, cfg))
    raw = [r.text.encode("utf-8") for r in records]
    m = cfg.minhash

    def write(tmp: Path) -> None:
        (tmp / "ids.json").write_text(json.dumps([r.id for r in records]))
        np.save(tmp / "nbytes.npy", np.array([len(b) for b in raw], dtype=np.int64))
        np.save(tmp / "url.npy", np.array([dedup.url_key(r.url) for r in records], dtype=np.uint64))
        content = np.frombuffer(b"".join(map(dedup.content_key, raw)), dtype=np.uint64)
        np.save(tmp / "content.npy", content.reshape(len(raw), 2))
        if m.enabled:
            a, b = minhash.permutations(m.bands * m.rows, m.seed)
            if m.shingle == "word":
                sig, n_sh = minhash.signatures(raw, m.n_gram, a, b)
            else:
                tok = _tokenizer()
                sig, n_sh = minhash.signatures_numpy(
                    [np.array(tok.encode(r.text)) for r in records], m.n_gram, a, b
                )
            keys, docs = minhash.band_runs(sig, m.bands, m.rows)
            for name, arr in (("sig", sig), ("n_shingles", n_sh), ("band_keys", keys), ("band_docs", docs)):
                np.save(tmp / f"{name}.npy", arr)
        if cfg.lines.enabled:
            per_doc = [dedup.line_keys(r.text, cfg.lines.min_chars) for r in records]
            np.save(tmp / "line_counts.npy", np.array([k.size for k in per_doc], dtype=np.int64))
            np.save(tmp / "line_keys.npy", np.concatenate(per_doc) if per_doc else np.zeros(0, np.uint64))

    _save_dir(target, write)
    return len(records)


# ---------------------------------------------------------------- pass 2: global dedup decisions


class _Scans:
    """The scan pass's per-shard arrays, concatenated or memory-mapped on demand."""

    def __init__(self, work: Path, n_shards: int):
        self.dirs = [work / "scan" / f"{s:05d}" for s in range(n_shards)]
        sizes = [np.load(d / "nbytes.npy", mmap_mode="r").size for d in self.dirs]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    def load(self, name: str) -> np.ndarray:
        return np.concatenate([np.load(d / f"{name}.npy") for d in self.dirs])

    def map(self, s: int, name: str) -> np.ndarray:
        if (s, name) not in self._maps:
            self._maps[(s, name)] = np.load(self.dirs[s] / f"{name}.npy", mmap_mode="r")
        return self._maps[(s, name)]

    def ids(self) -> list[str]:
        out: list[str] = []
        for d in self.dirs:
            out += json.loads((d / "ids.json").read_text())
        return out

    def signature_rows(self, docs: np.ndarray) -> np.ndarray:
        shard = np.searchsorted(self.offsets, docs, side="right") - 1
        first = self.map(0, "sig")
        out = np.empty((docs.size, first.shape[1]), dtype=np.uint32)
        for s in np.unique(shard):
            m = shard == s
            out[m] = self.map(int(s), "sig")[docs[m] - self.offsets[s]]
        return out


def _decide(cfg: CurateConfig, scans: _Scans, work: Path) -> dict[str, Any]:
    """Removal stage (0 kept, 1 url, 2 exact, 3 minhash), duplicate_of, line bucket per document."""
    n = int(scans.offsets[-1])
    removed = np.zeros(n, dtype=np.int8)
    dup_of = np.full(n, -1, dtype=np.int64)
    nbytes = scans.load("nbytes")

    def mark(kept: np.ndarray, stage: int) -> None:
        gone = (kept != np.arange(n)) & (removed == 0)
        removed[gone] = stage
        dup_of[gone] = kept[gone]

    if cfg.url.enabled:
        url = scans.load("url")
        prefer = nbytes if cfg.url.keep == "longest" else None
        mark(dedup.first_of_groups(url, (url != 0) & (removed == 0), prefer), 1)
    if cfg.exact.enabled:
        mark(dedup.first_of_groups(scans.load("content"), removed == 0), 2)
    info: dict[str, Any] = {}
    if cfg.minhash.enabled:
        alive = (removed == 0) & (scans.load("n_shingles") > 0)
        label, info = minhash.find_clusters(
            lambda b: [
                (scans.map(s, "band_keys")[b], scans.map(s, "band_docs")[b], scans.offsets[s])
                for s in range(len(scans.dirs))
            ],
            cfg.minhash.bands,
            alive,
            scans.signature_rows,
            cfg.minhash.threshold,
        )
        mark(label, 3)
        info["clusters"] = _largest_clusters(label, removed == 3)
    bucket = np.full(n, -1, dtype=np.int64)
    kept = np.flatnonzero(removed == 0)
    bucket[kept] = np.arange(kept.size) // cfg.lines.bucket_docs
    if cfg.lines.enabled:
        _count_lines(cfg, scans, bucket, work)
    np.savez(work / "decisions.tmp.npz", removed=removed, dup_of=dup_of, bucket=bucket)
    os.replace(work / "decisions.tmp.npz", work / "decisions.npz")
    return info


def _largest_clusters(label: np.ndarray, removed: np.ndarray, top: int = 10) -> list[tuple[int, list[int]]]:
    roots, sizes = np.unique(label[removed], return_counts=True)
    order = np.lexsort((roots, -sizes))[:top]
    return [(int(roots[i]), np.flatnonzero(label == roots[i]).tolist()) for i in order]


def _count_lines(cfg: CurateConfig, scans: _Scans, bucket: np.ndarray, work: Path) -> None:
    """Per bucket of surviving documents, the line keys seen more than max_count times."""
    (work / "lines").mkdir(exist_ok=True)
    current = 0
    parts: list[np.ndarray] = []

    def flush(b: int) -> None:
        keys = np.concatenate(parts) if parts else np.zeros(0, np.uint64)
        path = work / "lines" / f"bucket_{b:06d}.npy"
        np.save(path.with_suffix(".tmp.npy"), dedup.over_threshold_lines(keys, cfg.lines.max_count))
        os.replace(path.with_suffix(".tmp.npy"), path)

    for s in range(len(scans.dirs)):
        counts = np.load(scans.dirs[s] / "line_counts.npy")
        keys = scans.map(s, "line_keys")
        starts = np.concatenate([[0], np.cumsum(counts)])
        b_of = bucket[scans.offsets[s] : scans.offsets[s + 1]]
        for d in np.flatnonzero(b_of >= 0):
            if b_of[d] != current:
                flush(current)
                current, parts = int(b_of[d]), []
            parts.append(np.asarray(keys[starts[d] : starts[d + 1]]))
    flush(current)


# ---------------------------------------------------------------- pass 3: clean (lines, filters)


def _bad_lines(b: int) -> np.ndarray:
    cache = _state.setdefault("bad_lines", {})
    if b not in cache:
        cache.clear()
        cache[b] = np.load(_state["work"] / "lines" / f"bucket_{b:06d}.npy")
    return cache[b]


def _clean(job: tuple[int, list[Task], int]) -> None:
    s, shard, first = job
    cfg: CurateConfig = _state["cfg"]
    work: Path = _state["work"]
    target = work / "clean" / f"{s:05d}"
    if target.is_dir():
        return
    dec = np.load(work / "decisions.npz")
    records = list(_read_shard(shard, cfg))
    removed = dec["removed"][first : first + len(records)]
    bucket = dec["bucket"][first : first + len(records)]
    words = filters.load_word_list(cfg.filters.words_file)
    kl_on = cfg.filters.enabled and cfg.filters.max_token_kl > 0
    if cfg.lines.enabled:  # the scan pass hashed every line already
        scan = work / "scan" / f"{s:05d}"
        all_keys = np.load(scan / "line_keys.npy")
        key_start = np.concatenate([[0], np.cumsum(np.load(scan / "line_counts.npy"))])
    line_edits, removals, out = [], [], []
    stats = {"lines_removed": 0, "line_bytes_removed": 0}
    hists: list[tuple[np.ndarray, np.ndarray]] = []
    for d, rec in enumerate(records):
        if removed[d]:
            continue
        text = rec.text
        if cfg.lines.enabled:
            keys = all_keys[key_start[d] : key_start[d + 1]]
            bad = np.isin(keys, _bad_lines(int(bucket[d])))
            if bad.any():
                lines = text.split("\n")
                text = "\n".join(ln for ln, b in zip(lines, bad) if not b)
                stats["lines_removed"] += int(bad.sum())
                cut = len(rec.text.encode()) - len(text.encode())
                stats["line_bytes_removed"] += cut
                line_edits.append((first + d, cut))
            if not text.strip():
                reason = "empty_after_line_dedup" if bad.any() else "empty"
                removals.append(Removal(first + d, "lines", reason, float(bad.sum())))
                continue
        if cfg.filters.enabled:
            fail = filters.first_failure(text, cfg.filters, words)
            if fail is not None:
                removals.append(Removal(first + d, "filters", fail[0], fail[1], text[:SNIPPET_CHARS]))
                continue
        out.append((first + d, text, rec))
        if kl_on:
            hists.append(filters.token_histogram(np.array(_tokenizer().encode(text), dtype=np.uint32)))

    def write(tmp: Path) -> None:
        with open(tmp / "docs.jsonl", "w", encoding="utf-8") as f:
            for g, text, rec in out:
                f.write(_jsonl_line(text, rec, g) + "\n")
        rows = [r.to_list() for r in removals]
        (tmp / "stats.json").write_text(json.dumps({**stats, "line_edits": line_edits, "removals": rows}))
        if kl_on:
            lens = np.array([u.size for u, _ in hists], dtype=np.int64)
            uniq = np.concatenate([u for u, _ in hists]) if hists else np.zeros(0, np.uint32)
            cnt = np.concatenate([c for _, c in hists]) if hists else np.zeros(0, np.uint32)
            np.savez(tmp / "hist.npz", uniq=uniq, counts=cnt, lens=lens)
            vocab = _tokenizer().n_words
            np.save(
                tmp / "corpus_counts.npy", np.bincount(uniq, weights=cnt, minlength=vocab).astype(np.int64)
            )

    _save_dir(target, write)


def _jsonl_line(text: str, rec: Record, doc: int) -> str:
    obj: dict[str, Any] = {"text": text, "id": rec.id}
    if rec.url is not None:
        obj["url"] = rec.url
    obj["doc"] = doc
    return json.dumps(obj, ensure_ascii=False)


# ---------------------------------------------------------------- pass 4: KL filter and write


def _write(s: int) -> None:
    cfg: CurateConfig = _state["cfg"]
    work: Path = _state["work"]
    src = work / "clean" / f"{s:05d}"
    done = work / "final" / f"{s:05d}.json"
    if done.is_file():
        return
    lines = (src / "docs.jsonl").read_text(encoding="utf-8").splitlines()
    removals: list[Removal] = []
    keep = np.ones(len(lines), dtype=bool)
    if cfg.filters.enabled and cfg.filters.max_token_kl > 0 and lines:
        log_q = np.load(work / "corpus_log_q.npy", mmap_mode="r")
        h = np.load(src / "hist.npz")
        starts = np.concatenate([[0], np.cumsum(h["lens"])])
        for i, line in enumerate(lines):
            sl = slice(starts[i], starts[i + 1])
            kl = filters.kl_divergence(h["uniq"][sl], h["counts"][sl], log_q)
            if kl > cfg.filters.max_token_kl:
                keep[i] = False
                obj = json.loads(line)
                removals.append(
                    Removal(obj["doc"], "token_kl", "token_kl", round(kl, 4), obj["text"][:SNIPPET_CHARS])
                )
    kept = []
    for line, k in zip(lines, keep):
        if k:
            obj = json.loads(line)
            obj.pop("doc")
            kept.append(json.dumps(obj, ensure_ascii=False))
    if kept:
        tmp = work / "final" / f"shard_{s:05d}.jsonl.tmp"
        tmp.write_text("\n".join(kept) + "\n", encoding="utf-8")
        os.replace(tmp, work / "final" / f"shard_{s:05d}.jsonl")
    write_json_atomic(done, {"removals": [r.to_list() for r in removals], "docs": len(kept)})


def _corpus_log_q(work: Path, n_shards: int) -> None:
    total = None
    for s in range(n_shards):
        p = work / "clean" / f"{s:05d}" / "corpus_counts.npy"
        c = np.load(p)
        total = c if total is None else total + c
    assert total is not None
    with np.errstate(divide="ignore"):
        log_q = np.log(total / max(1, total.sum()))
    np.save(work / "corpus_log_q.tmp.npy", log_q)
    os.replace(work / "corpus_log_q.tmp.npy", work / "corpus_log_q.npy")


# ---------------------------------------------------------------- the job


def curate(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    out_dir: str | os.PathLike,
    cfg: CurateConfig | None = None,
    *,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Curate `inputs` into `out_dir` (JSONL shards, report.json, removed.ndjson); returns the report."""
    cfg = cfg or CurateConfig()
    cfg.validate()
    exts = tuple(sorted({e if e.startswith(".") else "." + e for e in cfg.extensions}))
    files = expand_inputs(inputs, exts, walk_jsonl=True)
    shards = plan_shards(files, max(1, int(cfg.shard_mb * (1 << 20))))
    out = Path(out_dir)
    work = _prepare_work(out, _fingerprint(cfg, shards), overwrite)

    counts = _pool_map(_scan, list(enumerate(shards)), cfg, work, "scan", progress)
    if sum(counts) == 0:
        raise DataError(f"empty input: {len(files)} input file(s) hold no documents; give non-empty input")
    scans = _Scans(work, len(shards))
    info = _decide(cfg, scans, work)
    firsts = scans.offsets[:-1].tolist()
    _pool_map(
        _clean, [(s, shard, int(firsts[s])) for s, shard in enumerate(shards)], cfg, work, "clean", progress
    )
    if cfg.filters.enabled and cfg.filters.max_token_kl > 0:
        _corpus_log_q(work, len(shards))
    _pool_map(_write, list(range(len(shards))), cfg, work, "write", progress)

    report, removed_lines = _gather_report(cfg, scans, work, info, len(files))
    final = work / "final"
    for p in final.glob("*.json"):
        p.unlink()
    with open(final / "removed.ndjson.tmp", "w", encoding="utf-8") as f:
        f.writelines(removed_lines)
    os.replace(final / "removed.ndjson.tmp", final / "removed.ndjson")
    # No report.txt: prepare reads .txt files in the folder as documents.
    write_json_atomic(final / "report.json", report)
    commit_dir(final, out)
    shutil.rmtree(work, ignore_errors=True)
    return report


def _gather_report(
    cfg: CurateConfig, scans: _Scans, work: Path, info: dict[str, Any], n_files: int
) -> tuple[dict[str, Any], list[str]]:
    dec = np.load(work / "decisions.npz")
    removed, dup_of = dec["removed"], dec["dup_of"]
    nbytes = scans.load("nbytes")
    ids = scans.ids()
    removals = [
        Removal(int(d), _REMOVED_BY[int(removed[d])], "duplicate", duplicate_of=ids[int(dup_of[d])])
        for d in np.flatnonzero(removed)
    ]
    lines_removed, line_edits = 0, []
    for s in range(len(scans.dirs)):
        st = json.loads((work / "clean" / f"{s:05d}" / "stats.json").read_text())
        removals += [Removal.from_list(r) for r in st["removals"]]
        lines_removed += st["lines_removed"]
        line_edits += st["line_edits"]
        removals += [
            Removal.from_list(r)
            for r in json.loads((work / "final" / f"{s:05d}.json").read_text())["removals"]
        ]
    removals.sort(key=lambda r: r.doc)
    stage_of = {r.doc: r.stage for r in removals}
    flow = []
    alive = np.ones(nbytes.size, dtype=bool)
    byte_now = nbytes.astype(np.int64).copy()
    for stage in STAGES:
        docs_in, bytes_in = int(alive.sum()), int(byte_now[alive].sum())
        if stage == "lines":
            for doc, cut in line_edits:
                byte_now[doc] -= cut
        alive[[d for d, st in stage_of.items() if st == stage]] = False
        bytes_out = int(byte_now[alive].sum())
        flow.append(StageCount(stage, docs_in, bytes_in, int(alive.sum()), bytes_out))
    clusters = [(ids[root], [ids[m] for m in members]) for root, members in info.get("clusters", [])]
    report = build_report(
        cfg=config_to_dict(cfg),
        n_files=n_files,
        flow=flow,
        removals=removals,
        ids=ids,
        nbytes=nbytes,
        clusters=clusters,
        minhash_pairs={k: v for k, v in info.items() if k != "clusters"},
        lines_removed=lines_removed,
        examples=cfg.examples,
    )
    return report, [json.dumps(r.record(ids), ensure_ascii=False) + "\n" for r in removals]
