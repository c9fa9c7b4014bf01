"""The curation report: what each stage removed, why, and a few examples of each reason.

`report.json` holds: `input` and `output` (documents, bytes), `stages` (documents and bytes in
and out of each stage, in order), `reasons` (documents and bytes per stage and reason),
`lines_removed`, `minhash` (candidate and confirmed pairs, the largest clusters with their kept
document first), `examples` (up to `examples` removals per reason: id, measured value or the
document it duplicates, the start of the text), and the `config` used. `format_report` prints
the same as a table.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Removal", "StageCount", "build_report", "format_report"]


@dataclass
class Removal:
    """One removed document (global number `doc`) and why."""

    doc: int
    stage: str
    reason: str
    value: float | None = None
    snippet: str | None = None
    duplicate_of: str | None = None

    def to_list(self) -> list:
        return [self.doc, self.stage, self.reason, self.value, self.snippet, self.duplicate_of]

    @classmethod
    def from_list(cls, row: list) -> Removal:
        return cls(*row)

    def record(self, ids: list[str]) -> dict[str, Any]:
        """The line of removed.ndjson."""
        out: dict[str, Any] = {"id": ids[self.doc], "stage": self.stage, "reason": self.reason}
        if self.value is not None:
            out["value"] = self.value
        if self.duplicate_of is not None:
            out["duplicate_of"] = self.duplicate_of
        return out


@dataclass
class StageCount:
    stage: str
    docs_in: int
    bytes_in: int
    docs_out: int
    bytes_out: int


def build_report(
    *,
    cfg: dict[str, Any],
    n_files: int,
    flow: list[StageCount],
    removals: list[Removal],
    ids: list[str],
    nbytes: np.ndarray,
    clusters: list[tuple[str, list[str]]],
    minhash_pairs: dict[str, int],
    lines_removed: int,
    examples: int,
) -> dict[str, Any]:
    docs: Counter = Counter()
    size: Counter = Counter()
    shown: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in removals:
        key = (r.stage, r.reason)
        docs[key] += 1
        size[key] += int(nbytes[r.doc])
        if len(shown[f"{r.stage}/{r.reason}"]) < examples:
            ex: dict[str, Any] = {"id": ids[r.doc]}
            if r.duplicate_of is not None:
                ex["duplicate_of"] = r.duplicate_of
            if r.value is not None:
                ex["value"] = r.value
            if r.snippet is not None:
                ex["text"] = r.snippet
            shown[f"{r.stage}/{r.reason}"].append(ex)
    order = {s.stage: i for i, s in enumerate(flow)}
    reasons = [
        {"stage": st, "reason": rs, "documents": docs[(st, rs)], "input_bytes": size[(st, rs)]}
        for st, rs in sorted(docs, key=lambda k: (order.get(k[0], 99), -docs[k], k[1]))
    ]
    last = flow[-1]
    return {
        "input": {"files": n_files, "documents": flow[0].docs_in, "bytes": flow[0].bytes_in},
        "output": {"documents": last.docs_out, "bytes": last.bytes_out},
        "stages": [
            {
                "stage": s.stage,
                "enabled": _enabled(cfg, s.stage),
                "documents_in": s.docs_in,
                "bytes_in": s.bytes_in,
                "documents_out": s.docs_out,
                "bytes_out": s.bytes_out,
            }
            for s in flow
        ],
        "reasons": reasons,
        "lines_removed": lines_removed,
        "minhash": {
            **minhash_pairs,
            "largest_clusters": [{"kept": c[0], "size": len(c[1]), "members": c[1][:10]} for c in clusters],
        },
        "examples": dict(shown),
        "config": cfg,
    }


def _enabled(cfg: dict[str, Any], stage: str) -> bool:
    if stage == "token_kl":
        return bool(cfg["filters"]["enabled"] and cfg["filters"]["max_token_kl"] > 0)
    return bool(cfg[stage]["enabled"])


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f}"


def format_report(report: dict[str, Any]) -> str:
    """The report as a plain-text table (what the CLI prints and report.txt holds)."""
    i, o = report["input"], report["output"]
    lines = [
        f"curated {i['documents']:,} documents ({_mb(i['bytes'])} MB) from {i['files']:,} file(s) "
        f"-> {o['documents']:,} documents ({_mb(o['bytes'])} MB)",
        "",
        f"{'stage':<10} {'docs in':>10} {'docs out':>10} {'removed':>9} {'MB in':>9} {'MB out':>9}",
    ]
    for s in report["stages"]:
        removed = s["documents_in"] - s["documents_out"]
        off = "" if s["enabled"] else "  (off)"
        lines.append(
            f"{s['stage']:<10} {s['documents_in']:>10,} {s['documents_out']:>10,} {removed:>9,} "
            f"{_mb(s['bytes_in']):>9} {_mb(s['bytes_out']):>9}{off}"
        )
    if report["lines_removed"]:
        lines.append(f"lines stage: {report['lines_removed']:,} lines removed")
    if report["reasons"]:
        lines += ["", f"{'stage/reason':<34} {'docs':>8} {'MB':>9}"]
        for r in report["reasons"]:
            lines.append(
                f"{r['stage'] + '/' + r['reason']:<34} {r['documents']:>8,} {_mb(r['input_bytes']):>9}"
            )
    mh = report["minhash"]
    if mh.get("largest_clusters"):
        lines += ["", f"largest near-duplicate clusters ({mh['confirmed_pairs']:,} confirmed pairs):"]
        for c in mh["largest_clusters"][:5]:
            lines.append(f"  {c['size']} documents, kept {c['kept']}")
    return "\n".join(lines) + "\n"
