"""The data path against its peers, side by side in one run (CPU).

    python -m benchmarks.bench_data_path            # 10M documents, seq 8192; the stdlib corpus
    python -m benchmarks.bench_data_path --quick    # CI-sized, seconds; writes to --out or a temp dir
    pip install -e ".[bench]"                       # megatron-core: the optional peer

Cases (rows: one per case and provider; `speedup` = peer time / our time, above 1 we are faster):

- `sample_idx in order`: `indices.build_sample_idx(sizes, 8192)` against megatron-core's
  `helpers_cpp.build_sample_idx_int64(sizes, arange, ...)`; documents of lognormal lengths.
- `sample_idx shuffled`: the same with a shuffled document order (`doc_idx`, gathered inside the
  loop by both).
- `blending`: the paper's 0.50/0.25/0.17/0.08 mix over 10M samples against
  `helpers_cpp.build_blending_indices` (output allocation included for both).
- `prepare vs raw tiktoken`: `python -m llama3hp.data.prepare --stdlib` against a script that loads
  the same tokenizer.model with tiktoken, reads the same files and encodes them with
  `encode_ordinary_batch(num_threads=2)` into one uint32 file: whole processes, start-up included.

Agreement: before timing, the sample index rows must equal Megatron's (our segment sizes count
(input, target) pairs, so the last document holds one pair fewer than its tokens); the blend's
realised shares are listed for both (Megatron's rule uses max(j, 1) where ours uses j + 1, so
individual rows may differ).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.workload import header, paired, parse_args, publish, run_process

WEIGHTS = np.array([0.50, 0.25, 0.17, 0.08])

RAW_TIKTOKEN = r"""
import sys
import numpy as np, tiktoken
from tiktoken.load import load_tiktoken_bpe
ranks = load_tiktoken_bpe(sys.argv[1])
pat = sys.argv[2]
special = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001}
enc = tiktoken.Encoding("llama3", pat_str=pat, mergeable_ranks=ranks, special_tokens=special)
files = [p for p in open(sys.argv[3]).read().split("\n") if p]
texts = [open(p, "rb").read().decode("utf-8") for p in files]  # bytes as they are, like prepare
texts = [t for t in texts if t]  # prepare skips empty documents
with open(sys.argv[4], "wb") as out:
    for ids in enc.encode_ordinary_batch(texts, num_threads=2):
        out.write(np.array([128000, *ids, 128001], dtype=np.uint32).tobytes())
"""


def megatron_helpers():
    """megatron-core's compiled helpers, or None (with the reason printed once)."""
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from megatron.core.datasets import helpers_cpp
    except Exception as e:  # noqa: BLE001 - any failure means the peer is absent
        print(f"megatron-core: not importable ({type(e).__name__}: {e}); its columns are skipped")
        return None
    return helpers_cpp


def doc_sizes(n_docs: int, seed: int = 0) -> np.ndarray:
    """int32 document lengths in tokens: lognormal, median ~600, clipped to [2, 65536]."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(6.4, 1.0, n_docs), 2, 65536).astype(np.int32)


def sample_idx_cases(n_docs: int, seq_len: int, reps: int, mg) -> list[dict]:
    from llama3hp.data import indices

    sizes32 = doc_sizes(n_docs)
    tokens = int(sizes32.sum(dtype=np.int64))
    rng = np.random.default_rng(1)
    cases = []
    for order in ("in order", "shuffled"):
        doc_idx32 = (
            np.arange(n_docs, dtype=np.int32)
            if order == "in order"
            else rng.permutation(n_docs).astype(np.int32)
        )
        # Ours counts (input, target) pairs: the last document of the stream holds one pair fewer.
        if order == "in order":
            pairs = sizes32.astype(np.int64)  # what TokenDataset.doc_lens holds
            pairs[-1] -= 1
            ours = lambda p=pairs: indices.build_sample_idx(p, seq_len)
        else:
            pairs = sizes32.copy()
            pairs[doc_idx32[-1]] -= 1
            ours = lambda p=pairs, d=doc_idx32: indices.build_sample_idx(p, seq_len, d)
        row = {"case": f"sample_idx {order}", "n_docs": n_docs, "seq_len": seq_len}
        got = ours()
        row["n_samples"] = int(got.shape[0] - 1)
        if mg is None:
            row.update(paired(ours, lambda: None, reps), peer_s=None, speedup=None)
        else:
            peer = lambda d=doc_idx32: mg.build_sample_idx_int64(sizes32, d, seq_len, 1, tokens, True, 1)
            want = peer()
            n = want.shape[0] - 1
            row["rows_agree"] = bool(got.shape[0] == want.shape[0] and np.array_equal(got[:n], want[:n]))
            row.update(paired(ours, peer, reps))
        cases.append(row)
    return cases


def blending_case(n_samples: int, reps: int, mg) -> dict:
    from llama3hp.data import indices

    ours = lambda: indices.build_blending_indices(WEIGHTS, np.zeros(4, np.int64), n_samples)
    row = {"case": "blending 4-way", "n_samples": n_samples}
    ds_idx, _, _ = ours()
    row["shares_ours"] = (np.bincount(ds_idx, minlength=4) / n_samples).round(4).tolist()
    if mg is None:
        row.update(paired(ours, lambda: None, reps), peer_s=None, speedup=None)
        return row

    def peer():
        ds = np.zeros(n_samples, dtype=np.int16)
        sample = np.zeros(n_samples, dtype=np.int64)
        mg.build_blending_indices(ds, sample, WEIGHTS, 4, n_samples, False)
        return ds

    row["shares_megatron"] = (np.bincount(peer(), minlength=4) / n_samples).round(4).tolist()
    row.update(paired(ours, peer, reps))
    return row


def prepare_case(files: list[Path], reps: int, work: Path) -> dict:
    from llama3hp.data.tokenizer import PAT_STR, default_tokenizer_path

    listing = work / "files.txt"
    listing.write_text("\n".join(map(str, files)))
    ours_cmd = [sys.executable, "-m", "llama3hp.data.prepare", *map(str, files), "--out", str(work / "prep")]
    ours_cmd += ["--workers", "2", "--overwrite"]
    raw_cmd = [sys.executable, "-c", RAW_TIKTOKEN, str(default_tokenizer_path()), PAT_STR, str(listing)]
    raw_cmd.append(str(work / "raw.bin"))
    a, b = [], []
    run_process(ours_cmd), run_process(raw_cmd)  # warm the page cache for both
    for i in range(reps):  # alternating who goes first, as `paired` does
        for cmd, acc in ((ours_cmd, a), (raw_cmd, b)) if i % 2 == 0 else ((raw_cmd, b), (ours_cmd, a)):
            acc.append(run_process(cmd))
    ours_tokens = sum(p.stat().st_size for p in (work / "prep").glob("shard_*.bin")) // 4
    raw_tokens = (work / "raw.bin").stat().st_size // 4
    med = lambda xs, k: float(np.median([x[k] for x in xs]))
    return {
        "case": "prepare vs raw tiktoken (2 workers, whole process)",
        "n_files": len(files),
        "tokens_agree": ours_tokens == raw_tokens,
        "ours_s": med(a, "wall_s"),
        "peer_s": med(b, "wall_s"),
        "ours_cpu_s": med(a, "cpu_s"),
        "peer_cpu_s": med(b, "cpu_s"),
        "speedup": float(np.median([y["wall_s"] / x["wall_s"] for x, y in zip(a, b)])),
        "mb_per_s_ours": sum(f.stat().st_size for f in files) / 1e6 / med(a, "wall_s"),
    }


def markdown(rows: list[dict], env: dict) -> str:
    lines = [
        *header("Data path against its peers (CPU)", env),
        "| case | size | llama3hp s | peer | peer s | speedup (peer s / ours) | agreement |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        size = r.get("n_docs") or r.get("n_samples") or r.get("n_files")
        peer = "raw tiktoken" if "tiktoken" in r["case"] else "megatron-core"
        if r["speedup"] is None:
            peer_s, speed, agree = "n/a (not installed)", "n/a", ""
        else:
            peer_s, speed = f"{r['peer_s']:.3f}", f"{r['speedup']:.2f}x"
            agree = (
                f"rows equal: {r['rows_agree']}"
                if "rows_agree" in r
                else f"shares {r['shares_ours']} vs {r['shares_megatron']}"
                if "shares_megatron" in r
                else f"same token count: {r['tokens_agree']}"
                if "tokens_agree" in r
                else ""
            )
        lines.append(
            f"| {r['case']} | {size:,} | {r['ours_s']:.3f} | {peer} | {peer_s} | {speed} | {agree} |"
        )
    lines += [
        "",
        "Targets (issue 17, measured, never asserted): every speedup >= 1.00x against megatron-core,",
    ]
    lines += [">= 0.95x against raw tiktoken.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv, __doc__, reps=7)
    from llama3hp.data import default_corpus_files

    n_docs, n_blend = (20_000, 50_000) if args.quick else (10_000_000, 10_000_000)
    mg = megatron_helpers()
    files = list(default_corpus_files())
    files = files[:40] if args.quick else files
    with tempfile.TemporaryDirectory() as tmp:
        rows = sample_idx_cases(n_docs, 8192, args.reps, mg)
        rows.append(blending_case(n_blend, args.reps, mg))
        rows.append(prepare_case(files, args.reps, Path(tmp)))
    return publish("data_path", rows, ["megatron-core"], markdown, args)


if __name__ == "__main__":
    main()
