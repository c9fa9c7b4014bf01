"""llama3hp.data: Llama 3 tokenizer, dataset preparation, memory-mapped shards, packed blended loader.

from llama3hp.data import prepare, DataConfig, build_loader
prepare(["corpus/"], "data/corpus")
loader = build_loader(DataConfig(datasets=["data/corpus"]), dp_rank=0, dp_size=1)
batch = loader.next_batch(rows=8, seq_len=2048)   # Batch(inputs, targets, cu_seqlens, ...)

The loader (and with it torch) is imported on first use of its names, so `prepare` and
`curate` start without paying torch's ~2 s import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from llama3hp.data.batch import Batch
from llama3hp.data.errors import DataError
from llama3hp.data.prepare import default_corpus_files, prepare
from llama3hp.data.shards import TokenDataset, write_token_dataset
from llama3hp.data.tokenizer import ChatFormat, Tokenizer

if TYPE_CHECKING:
    from llama3hp.data.loader import DataConfig, PackedLoader, build_loader

_LAZY = {name: "llama3hp.data.loader" for name in ("DataConfig", "PackedLoader", "build_loader")}

__all__ = [
    "Tokenizer",
    "ChatFormat",
    "prepare",
    "default_corpus_files",
    "TokenDataset",
    "write_token_dataset",
    "DataConfig",
    "build_loader",
    "PackedLoader",
    "Batch",
    "DataError",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
