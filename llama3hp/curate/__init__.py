"""llama3hp.curate: the paper's data curation in front of `prepare`, as a streaming multi-core pipeline.

    from llama3hp.curate import curate, load_config
    report = curate(["corpus/", "crawl.jsonl"], "curated/", load_config("curate.toml"))
    # then: llama3hp prepare curated/ --out data/curated

Stages, in order, each configurable and skippable (`config.py`): URL de-duplication, exact
de-duplication, MinHash near-duplicates (`minhash.py`), line-level de-duplication (`dedup.py`),
heuristic filters and the token KL divergence (`filters.py`); the passes and the process pool
live in `pipeline.py`, the report in `report.py`. Bad input raises `llama3hp.data.DataError`.
"""

from llama3hp.curate.config import CurateConfig, load_config
from llama3hp.curate.pipeline import curate
from llama3hp.curate.report import format_report

__all__ = ["curate", "CurateConfig", "load_config", "format_report"]
