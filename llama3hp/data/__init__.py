"""llama3hp.data: Llama 3 tokenizer, dataset preparation, memory-mapped shards, packed blended loader.

from llama3hp.data import prepare, DataConfig, build_loader
prepare(["corpus/"], "data/corpus")
loader = build_loader(DataConfig(datasets=["data/corpus"]), dp_rank=0, dp_size=1)
batch = loader.next_batch(rows=8, seq_len=2048)   # Batch(inputs, targets, cu_seqlens, ...)
"""

from llama3hp.data.errors import DataError
from llama3hp.data.loader import Batch, DataConfig, PackedLoader, build_loader
from llama3hp.data.prepare import default_corpus_files, prepare
from llama3hp.data.shards import TokenDataset, write_token_dataset
from llama3hp.data.tokenizer import ChatFormat, Tokenizer

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
