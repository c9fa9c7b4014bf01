"""Tensor-parallel serving on 2 gloo ranks against one process.

The ranks first write a checkpoint from a tensor-parallel TRAINING layout (each rank saves its
shards), then serve it with TP=2: rank 0 schedules and samples, rank 1 runs the worker loop. The
test process serves the same checkpoint on one process; greedy and seeded samples must agree."""

from __future__ import annotations

import pytest
import torch
from serving_testing import tiny_args

from tests.parallel.harness import spawn_workers

pytestmark = pytest.mark.xdist_group("inference_tp")

PROMPTS = [list(range(1000, 1000 + n)) for n in (3, 29, 17)]
GREEDY = dict(max_tokens=10, temperature=0.0, ignore_eos=True)
SAMPLED = dict(max_tokens=6, temperature=1.0, top_k=50, n=2, seed=3, ignore_eos=True)


def serve(model, group=None):
    from llama3hp.inference.engine import EngineConfig, LLMEngine
    from llama3hp.inference.sampling import SamplingParams

    engine = LLMEngine(
        model, EngineConfig(num_blocks=64, max_num_batched_tokens=24, max_num_seqs=8), group=group
    )
    if group is not None and torch.distributed.get_rank(group) != 0:
        engine.runner.serve_worker()
        return None
    out = {
        "greedy": [[r.token_ids for r in rs] for rs in engine.generate(PROMPTS, SamplingParams(**GREEDY))],
        "sampled": [
            [r.token_ids for r in rs] for rs in engine.generate(PROMPTS[:1], SamplingParams(**SAMPLED))
        ],
        "blocks_used": engine.kv_blocks_used,
        "local_kv_heads": engine.cache.k.shape[3],
    }
    engine.shutdown()
    return out


def tp_case(case: dict):
    import dataclasses

    import torch.distributed as dist

    from llama3hp.inference.loading import load_serving_model
    from llama3hp.parallel import ParallelConfig, build_mesh
    from llama3hp.train.checkpoint import save_model_checkpoint
    from tests.parallel.harness import build_whole_then_shard

    torch.set_num_threads(1)
    args = tiny_args()
    cfg = ParallelConfig(tp=2, cp=1, pp=1, dp=1)
    mesh = build_mesh(cfg)
    trained = build_whole_then_shard(args, mesh, cfg)  # a TP training layout's shards
    save_model_checkpoint(case["folder"], 1, trained, None, train_state={"model_args": dataclasses.asdict(args)},
                          group=mesh.world_group)  # fmt: skip
    group = dist.group.WORLD
    model = load_serving_model(case["folder"], device=torch.device("cpu"), group=group)
    return serve(model, group)


def test_tp2_serving_equals_one_process(tmp_path):
    from llama3hp.inference.loading import load_serving_model

    folder = str(tmp_path / "ckpt")
    ranks = spawn_workers(tp_case, 2, [{"name": "tp2", "folder": folder}], timeout_s=300)
    assert "error" not in ranks[0]["tp2"], ranks[0]["tp2"].get("error")
    assert "error" not in (ranks[1]["tp2"] or {}), ranks[1]["tp2"]
    tp = ranks[0]["tp2"]
    torch.set_num_threads(1)
    one = serve(load_serving_model(folder, device=torch.device("cpu")))
    assert tp["local_kv_heads"] == 1 and one["local_kv_heads"] == 2  # each rank caches its own heads
    assert tp["greedy"] == one["greedy"]
    assert tp["sampled"] == one["sampled"]
    assert tp["blocks_used"] == 0
