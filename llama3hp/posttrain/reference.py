"""DPO's frozen reference model: its log-probabilities of each pair, precomputed or co-resident.

Both fill `Batch.ref_logps` [n_pairs, 2] (chosen, rejected) before the policy's step
(`Reference.annotate`), so the DPO objective reads the same numbers either way:
- `PrecomputedReference`: one forward pass of the reference over the whole dataset (`compute_values`,
  any layout: `StepModel.evaluate` with `PairLogprobs`) writes two numbers per pair beside the data,
  keyed by sample id, under a header naming the tokenizer, the reference checkpoint (the SHA-256 of
  its manifest) and the data (its shards' SHA-256 and the packing settings that change the tokens
  scored); a file whose header names anything else is refused with a one-line `DataError`;
- `CoResidentReference`: the reference built with the same `parallelize` on the same layout,
  frozen, run forward on each step's micro-batches.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from llama3hp.data.batch import Batch
from llama3hp.data.errors import DataError
from llama3hp.parallel.step_model import StepModel
from llama3hp.posttrain.dpo import PairLogprobs

FORMAT = "llama3hp-reference-logprobs"


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """The reference checkpoint's identity: the SHA-256 of its manifest (which hashes every file)."""
    from llama3hp.train import checkpoint as ckpt

    folder = ckpt.resolve_checkpoint(Path(path))
    return hashlib.sha256((folder / ckpt.MANIFEST).read_bytes()).hexdigest()


def data_sha256(datasets: Sequence[Any], *, seq_len: int, too_long: str, mask_format_tokens: bool) -> str:
    """The scored data's identity: every shard's SHA-256 and the settings that change which tokens of a
    pair are scored (row length and truncation, formatting tokens in or out)."""
    shards = [
        [s["sha256"], s.get("roles_sha256"), s.get("pairs_sha256")]
        for ds in datasets
        for s in ds.manifest["shards"]
    ]
    key = {
        "shards": shards,
        "seq_len": seq_len,
        "too_long": too_long,
        "mask_format_tokens": mask_format_tokens,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


@dataclass
class ReferenceKey:
    tokenizer_sha256: str
    checkpoint_sha256: str
    data_sha256: str

    def default_path(self, dataset_dir: str | os.PathLike) -> Path:
        return Path(dataset_dir) / f"reference-{self.checkpoint_sha256[:12]}-{self.data_sha256[:12]}.json"


class Reference(Protocol):
    def annotate(self, batches: list[Batch]) -> None:
        """Set `ref_logps` [n_pairs, 2] of every batch (on its device)."""
        ...


class PrecomputedReference:
    """Values read from a file written by `write_values` (checked against `key`)."""

    def __init__(self, path: str | os.PathLike, key: ReferenceKey):
        self.path = Path(path)
        try:
            data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(
                f"cannot read reference values {self.path}: {e}; delete it to recompute"
            ) from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DataError(
                f"{self.path} is not a {FORMAT} file; delete it or point posttrain.reference_values elsewhere"
            )
        for name, want in (("tokenizer_sha256", key.tokenizer_sha256), ("checkpoint_sha256", key.checkpoint_sha256),
                           ("data_sha256", key.data_sha256)):  # fmt: skip
            if data.get(name) != want:
                what = name.removesuffix("_sha256")
                raise DataError(
                    f"reference values {self.path} were computed for another {what} ({str(data.get(name))[:12]}... , "
                    f"this run: {want[:12]}...); recompute them (leave posttrain.reference_values empty)"
                )
        ids = torch.tensor(data["sample_ids"], dtype=torch.int64)
        self.table = torch.full(
            (int(ids.max()) + 1 if ids.numel() else 0, 2), float("nan"), dtype=torch.float64
        )
        self.table[ids] = torch.tensor([data["chosen"], data["rejected"]], dtype=torch.float64).T

    def lookup(self, pair_ids: torch.Tensor) -> torch.Tensor:
        ids = pair_ids.cpu()
        if ids.numel() and (int(ids.max()) >= self.table.shape[0] or bool(self.table[ids].isnan().any())):
            raise DataError(f"reference values {self.path} lack some pairs of this data; recompute them")
        return self.table[ids].to(torch.float32)

    def annotate(self, batches: list[Batch]) -> None:
        for b in batches:
            assert b.pair_ids is not None, "DPO batches carry pair ids"
            b.ref_logps = self.lookup(b.pair_ids).to(b.inputs.device)


class CoResidentReference:
    """The frozen reference on the policy's layout, run forward on each step's micro-batches."""

    def __init__(self, model: StepModel, mask_format_tokens: bool):
        self.model, self.objective = model, PairLogprobs(mask_format_tokens)

    def annotate(self, batches: list[Batch]) -> None:
        for b in batches:
            assert b.pairs is not None, "DPO batches carry pairs"
            b.ref_logps = torch.zeros(b.pairs.shape[0], 2, dtype=torch.float32, device=b.inputs.device)
        self.model.evaluate(batches, self.objective)


def compute_values(
    model: StepModel, batches: list[Batch], mask_format_tokens: bool, *, holds_head: bool, group=None
) -> dict[int, tuple[float, float]]:
    """{sample id: (log π_ref(c), log π_ref(r))} over `batches` (this rank's, every pair once over the
    data-parallel ranks), gathered on every rank. `holds_head`: whether this rank runs the last
    pipeline stage (the only one whose values are filled)."""
    CoResidentReference(model, mask_format_tokens).annotate(batches)
    mine: dict[int, tuple[float, float]] = {}
    if holds_head:
        for b in batches:
            assert b.pair_ids is not None and b.ref_logps is not None
            for sid, (c, r) in zip(b.pair_ids.tolist(), b.ref_logps.tolist()):
                mine[int(sid)] = (float(c), float(r))
    if group is None:
        return mine
    parts: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, mine, group=group)
    return {k: v for part in parts for k, v in part.items()}


def write_values(path: Path, key: ReferenceKey, values: dict[int, tuple[float, float]]) -> None:
    ids = sorted(values)
    data = {
        "format": FORMAT, "tokenizer_sha256": key.tokenizer_sha256, "checkpoint_sha256": key.checkpoint_sha256,
        "data_sha256": key.data_sha256, "sample_ids": ids, "chosen": [values[i][0] for i in ids],
        "rejected": [values[i][1] for i in ids],
    }  # fmt: skip
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, path)
