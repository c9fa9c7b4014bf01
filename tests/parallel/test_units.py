"""Process-free checks: mesh arithmetic, layout errors, partitioning, schedules, the step-time model,
and the CP attention paths against the single-process reference."""

from __future__ import annotations

import pytest
import torch

from llama3hp.kernels import attention_ref
from llama3hp.kernels.attention import attention_varlen_ref
from llama3hp.parallel.context import build_cp_query_segments, cp_attention_masked, cp_token_index
from llama3hp.parallel.mesh import ParallelConfig, ParallelDims, resolve_dims, validate_layout
from llama3hp.parallel.pipeline import build_schedule, partition_layers, simulate
from llama3hp.parallel.plan import PAPER_LAYOUTS, main, plan
from tests.parallel.harness import small_args


def test_rank_order_tp_innermost():
    d = ParallelDims(tp=2, cp=2, pp=2, dp=2)
    assert d.world_size == 16
    assert d.coords(0) == {"tp": 0, "cp": 0, "pp": 0, "dp": 0}
    assert (
        d.coords(1)["tp"] == 1
        and d.coords(2)["cp"] == 1
        and d.coords(4)["pp"] == 1
        and d.coords(8)["dp"] == 1
    )
    assert all(d.rank_of(**d.coords(r)) == r for r in range(16))
    assert d.groups(("tp",))[0] == [0, 1]
    assert d.groups(("pp",))[0] == [0, 4]
    assert d.groups(("cp", "dp"))[0] == [0, 2, 8, 10]
    for dims in (("tp",), ("cp",), ("pp",), ("dp",), ("cp", "dp")):
        groups = d.groups(dims)
        assert sorted(r for g in groups for r in g) == list(range(16))


def test_dp_inferred_and_world_mismatch():
    assert resolve_dims(ParallelConfig(tp=2, pp=2), 8).dp == 2
    with pytest.raises(ValueError, match="world size 8 != tp"):
        resolve_dims(ParallelConfig(tp=2, pp=2, dp=3), 8)
    with pytest.raises(ValueError, match="not divisible by tp\\*cp\\*pp"):
        resolve_dims(ParallelConfig(tp=3), 8)


@pytest.mark.parametrize(
    "cfg, seq, match",
    [
        (ParallelConfig(tp=8, dp=1), None, "n_heads"),
        (ParallelConfig(tp=4, dp=1), None, "n_kv_heads"),
        (ParallelConfig(pp=8, dp=1), None, "cannot be split"),
        (ParallelConfig(cp=3, dp=1), 16, "2\\*cp"),
        (ParallelConfig(tp=2, cp=2, dp=1, tp_overlap=True, tp_overlap_chunks=8), 16, "sequence parallelism"),
        (ParallelConfig(zero_stage=4, dp=1), None, "zero_stage"),
        (ParallelConfig(pp_schedule="gpipe", dp=1), None, "pp_schedule"),
        (ParallelConfig(zero3_gather_dtype="float16", dp=1), None, "zero3_gather_dtype"),
    ],
)
def test_invalid_layouts_one_error_each(cfg, seq, match):
    dims = ParallelDims(cfg.tp, cfg.cp, cfg.pp, 1)
    with pytest.raises(ValueError, match=match):
        validate_layout(cfg, dims, small_args(n_heads=4, n_kv_heads=2, n_layers=4), seq)


def test_partition_gives_edge_stages_fewer_layers():
    assert partition_layers(126, 16)[0] == (0, 7) and partition_layers(126, 16)[-1] == (119, 126)
    assert all(b - a == 8 for a, b in partition_layers(126, 16)[1:-1])
    assert partition_layers(8, 2, edge_cost=0) == [(0, 4), (4, 8)]
    assert partition_layers(5, 2, explicit=[2, 3]) == [(0, 2), (2, 5)]
    with pytest.raises(ValueError, match="pp_stage_layers"):
        partition_layers(5, 2, explicit=[2, 2])


def test_1f1b_reads_warmup_steady_cooldown_and_bubble():
    acts = build_schedule("1f1b", 4, 1, 6, 0)
    assert [a.kind for a in acts] == list("FFF" + "FB" * 3 + "BBB")
    for p in (2, 4):
        for m in (1, 3, 5, 8):
            assert simulate("1f1b", p, 1, m).bubble == pytest.approx((p - 1) / (m + p - 1))
            assert simulate("1f1b", p, 1, m).peak_in_flight[0] == min(p, m)


def test_interleaved_smaller_bubble_and_m_not_multiple_of_pp():
    one, inter = simulate("1f1b", 4, 1, 8), simulate("interleaved", 4, 2, 8)
    assert inter.bubble < one.bubble
    simulate("interleaved", 4, 2, 6)  # 6 micro-batches on 4 stages: runs without deadlock
    for r in range(4):
        acts = build_schedule("interleaved", 4, 2, 6, r)
        assert sorted((a.kind, a.mb, a.chunk) for a in acts) == sorted(
            (k, mb, c) for k in "FB" for mb in range(6) for c in range(2)
        )


def test_paper_405b_layouts_within_5_mfu_points():
    for (name, (tp, cp, pp, dp, seq, rows)), target in zip(PAPER_LAYOUTS.items(), (0.43, 0.41, 0.38)):
        r = plan("llama3_405b", tp, cp, pp, dp, seq, rows, virtual=4)
        assert abs(r.mfu - target) < 0.05, (name, r.mfu)
        assert r.mem_weights_gib > 0 and r.mem_activations_gib > 0


def test_plan_activation_checkpointing_trades_memory_for_recompute():
    from llama3hp.model import get_model_args
    from llama3hp.model.flops import flops_per_token

    layout = ("llama3_8b", 1, 1, 1, 8, 8192, 64)
    base, half, full = (
        plan(*layout, checkpointing=c, checkpoint_every=e) for c, e in (("none", 1), ("full", 2), ("full", 1))
    )
    assert full.mem_activations_gib / base.mem_activations_gib == pytest.approx(4 / 34)  # fp32 block input
    assert full.mem_activations_gib < half.mem_activations_gib < base.mem_activations_gib
    args = get_model_args("llama3_8b")
    head = 6 * args.dim * args.vocab_size / flops_per_token(args, 8192)
    assert full.compute_s / base.compute_s == pytest.approx(1 + (1 - head) / 3)  # blocks rerun their forward
    assert base.mfu > half.mfu > full.mfu  # recompute is not model FLOPs
    with pytest.raises(ValueError, match="checkpoint_every"):
        plan(*layout, checkpointing="full", checkpoint_every=0)


def test_plan_dp_traffic_follows_the_zero_stage_and_the_link():
    from llama3hp.parallel.plan import Hardware

    hw = Hardware()
    one_node = {z: plan("llama3_8b", 1, 1, 1, 8, 8192, 64, zero_stage=z) for z in (1, 2, 3)}
    two_nodes = plan("llama3_8b", 1, 1, 1, 16, 8192, 64, zero_stage=3)
    m = one_node[3].microbatches  # 8: stages 2-3 reduce after every micro-batch, 3 gathers twice more
    assert one_node[2].dp_s / one_node[1].dp_s == pytest.approx((4 * m + 4) / 12)
    assert one_node[3].dp_s / one_node[1].dp_s == pytest.approx(12 * m / 12)
    bf16 = plan("llama3_8b", 1, 1, 1, 8, 8192, 64, zero_stage=3, zero3_gather_dtype="bfloat16")
    assert bf16.dp_s / one_node[3].dp_s == pytest.approx(8 / 12)  # gathers at 2 bytes instead of 4
    # 16 GPUs span two nodes: the scale-out network instead of NVLink (and half the micro-batches)
    ratio = (two_nodes.dp_s / one_node[3].dp_s) * (m / two_nodes.microbatches) * (7 / 8) / (15 / 16)
    assert ratio == pytest.approx(hw.nvlink_gbs / hw.network_gbs)


def test_plan_cli(capsys):
    assert main(["llama3_8b", "--tp", "2", "--pp", "2", "--dp", "2", "--seq", "4096", "--batch", "16"]) == 0
    out = capsys.readouterr().out
    assert "MFU" in out and "1f1b" in out
    assert main(["llama3_8b", "--tp", "3"]) == 2


def _packed(B, T, cuts):
    bounds = [0]
    for r in range(B):
        bounds += [r * T + c for c in cuts] + [(r + 1) * T]
    return torch.tensor(bounds, dtype=torch.int32)


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_attention_matches_reference_across_chunk_borders(cp):
    B, T, H, Hk, D = 2, 32, 4, 2, 16
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, Hk, D), torch.randn(B, T, Hk, D)
    cu = _packed(B, T, [5, 19, 20])  # documents crossing chunk borders, one of length 1
    ref = attention_ref(q, k, v, cu)
    order = torch.cat([cp_token_index(T, cp, r) for r in range(cp)])
    for rank in range(cp):
        idx = cp_token_index(T, cp, rank)
        out = cp_attention_masked(q[:, idx], k[:, order], v[:, order], cu, cp, rank)
        torch.testing.assert_close(out, ref[:, idx], rtol=1e-5, atol=1e-5)
        # The varlen form the CUDA path uses (reference implementation here) agrees too.
        c = T // (2 * cp)
        seg = build_cp_query_segments(
            cu, [(b * T + j * c, b * T + (j + 1) * c) for b in range(B) for j in (rank, 2 * cp - 1 - rank)]
        )
        out_v, _ = attention_varlen_ref(
            q[:, idx].reshape(-1, H, D), k.reshape(-1, Hk, D), v.reshape(-1, Hk, D), seg.cu_seqlens_q, cu,
            q_doc_idx=seg.q_doc_idx, q_pos_offsets=seg.q_pos_offsets,
        )  # fmt: skip
        torch.testing.assert_close(out_v.view(B, -1, H, D), ref[:, idx], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llama3_405b_8k", "llama3_405b_128k"])
def test_launch_configs_validate_with_mesh_rules(name):
    import tomllib
    from pathlib import Path

    from llama3hp.model import get_model_args

    t = tomllib.loads((Path(__file__).parents[2] / "launch" / "configs" / f"{name}.toml").read_text())
    cfg = ParallelConfig(**t["parallel"])
    dims = ParallelDims(cfg.tp, cfg.cp, cfg.pp, cfg.dp)
    validate_layout(cfg, dims, get_model_args(t["model"]["preset"]), t["training"]["seq_len"])
    assert dims.world_size == 8192


def _cp_split_grads(q, k, v, cu, cp, backend, g):
    """Run the overlapped CP attention rank by rank (gathered K/V handed in) and assemble outputs and
    input gradients over the whole sequence."""
    from llama3hp.parallel.context import build_cp_split_segments, cp_attention_split

    B, T = q.shape[:2]
    order = torch.cat([cp_token_index(T, cp, r) for r in range(cp)])
    out_all = torch.empty_like(q)
    grads = [torch.zeros_like(t) for t in (q, k, v)]
    for rank in range(cp):
        idx = cp_token_index(T, cp, rank)
        local = [t.detach()[:, idx].requires_grad_() for t in (q, k, v)]
        k_all, v_all = (t.detach()[:, order].requires_grad_() for t in (k, v))
        segs = build_cp_split_segments(cu, B, T, cp, rank)
        out = cp_attention_split(*local, lambda kv=(k_all, v_all): kv, segs, cp, backend)
        out_all[:, idx] = out.detach()
        dq, dk, dv, dk_all, dv_all = torch.autograd.grad((out * g[:, idx]).sum(), (*local, k_all, v_all))
        grads[0][:, idx] += dq
        grads[1][:, idx] += dk
        grads[2][:, idx] += dv
        grads[1][:, order] += dk_all
        grads[2][:, order] += dv_all
    return out_all, grads


@pytest.mark.parametrize("backend, cp, B", [("torch", 2, 2), ("torch", 4, 2), ("triton", 2, 1)])
def test_cp_overlapped_split_attention_matches_reference_with_grads(backend, cp, B):
    # diagonal + earlier-keys parts merged by lse == one softmax: outputs and dQ/dK/dV (the dK/dV
    # summed over the local diagonal and the gathered copy, as the reduce-scatter does)
    T, H, Hk, D = 32, 4, 2, 16
    q, k, v = (torch.randn(B, T, h, D, requires_grad=True) for h in (H, Hk, Hk))
    cu = _packed(B, T, [5, 19, 20])  # a document starting inside a chunk, one of length 1
    ref = attention_ref(q, k, v, cu)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad((ref * g).sum(), (q, k, v))
    out, grads = _cp_split_grads(q, k, v, cu, cp, backend, g)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_cp_split_segments_one_document_per_row():
    from llama3hp.parallel.context import build_cp_split_segments

    segs = build_cp_split_segments(None, 2, 16, 2, 0)  # chunks of 4: rank 0 holds 0 and 3
    assert segs.local_cu.tolist() == [0, 4, 8, 12, 16]
    assert segs.remote[0] is None  # chunk 0 has no earlier keys
    cu_q, cu_k, q_doc, q_pos, _, max_k = segs.remote[1]
    assert cu_q.tolist() == [0, 4, 8] and max_k == 12
    # chunk 3 of row r sees keys [16r, 16r + 12): the first key document of its row
    assert [cu_k[d].item() for d in q_doc.tolist()] == [0, 16] and (q_pos == 16).all()


@pytest.mark.parametrize("fused", [False, True])
def test_chunked_vocab_parallel_loss_matches_reference(fused):
    # one shard (no group) is the whole vocabulary: chunks of 5 rows over 13, ignored rows, z-loss;
    # fused runs the cross-entropy kernel on each chunk (interpreted on CPU)
    from llama3hp.kernels import linear_cross_entropy_ref
    from llama3hp.parallel.vocab_parallel import VocabParallelLinearCrossEntropy

    N, D, V = 13, 16, 40
    h, w = torch.randn(N, D, requires_grad=True), torch.randn(V, D, requires_grad=True)
    t = torch.randint(0, V, (N,))
    t[3] = -100
    g = torch.rand(N)
    ref = linear_cross_entropy_ref(h, w, t, reduction="none", z_loss_scale=1e-2)
    want = torch.autograd.grad((ref * g).sum(), (h, w))
    out = VocabParallelLinearCrossEntropy.apply(h, w, t, 0, None, -100, 1e-2, 5, fused, h.dtype)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-6)
    for got, exp in zip(torch.autograd.grad((out * g).sum(), (h, w)), want):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)


def test_vocab_parallel_loss_shards_combine_like_the_whole_vocabulary():
    # two vocabulary shards computed separately and combined by hand as the all-reduces would:
    # max of the shard lse, sum of exp, target logit from the owning shard
    from llama3hp.kernels.cross_entropy import logits_lse

    N, D, V = 7, 8, 24
    h, w = torch.randn(N, D), torch.randn(V, D)
    parts = [logits_lse(h @ w[s : s + V // 2].T, fused=False) for s in (0, V // 2)]
    m = torch.maximum(*parts)
    lse = m + torch.log(sum(torch.exp(p - m) for p in parts))
    torch.testing.assert_close(lse, torch.logsumexp(h @ w.T, dim=-1))


def test_rank_local_init_matches_init_weights_and_errors():
    from llama3hp.model import Transformer, init_parameter
    from llama3hp.parallel import ParallelConfig, build_mesh, parallelize

    args = small_args(n_layers=2)
    model = Transformer(args)
    model.init_weights(seed=3)
    for name, p in model.named_parameters():
        assert torch.equal(init_parameter(args, name, tuple(p.shape), 3), p.detach()), name
    mesh = build_mesh(ParallelConfig(dp=1))
    with torch.device("meta"):
        meta = Transformer(args)
    with pytest.raises(ValueError, match="meta device: pass init_seed"):
        parallelize(meta, mesh, ParallelConfig(dp=1))
    with pytest.raises(ValueError, match="init_seed materialises a meta-device model"):
        parallelize(model, mesh, ParallelConfig(dp=1), init_seed=3)
    pm = parallelize(meta, mesh, ParallelConfig(dp=1), init_seed=3)
    got = pm.full_state_dict()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())


def test_cp_split_keeps_gather_in_graph_without_remote_keys():
    # rank 0 of cp=2 holds chunks 0 and 3; a document starting exactly at chunk 3 leaves it no earlier
    # key: dK_all must still be a (zero) gradient, or the rank would skip the reduce-scatter its peers join
    from llama3hp.parallel.context import build_cp_split_segments, cp_attention_split

    B, T, H, Hk, D = 1, 16, 2, 1, 16
    cu = torch.tensor([0, 12, 16], dtype=torch.int32)
    segs = build_cp_split_segments(cu, B, T, 2, 0)
    assert not segs.remote_has_keys
    q, k, v = (torch.randn(B, T // 2, h, D, requires_grad=True) for h in (H, Hk, Hk))
    k_all, v_all = (torch.randn(B, T, Hk, D, requires_grad=True) for _ in range(2))
    out = cp_attention_split(q, k, v, lambda: (k_all, v_all), segs, 2, "torch")
    dk_all, dv_all = torch.autograd.grad(out.sum(), (k_all, v_all))
    assert not dk_all.any() and not dv_all.any()


@pytest.mark.parametrize("stage", [2, 3])
def test_sharded_gradients_free_their_full_buffers_between_micro_batches(stage):
    """ZeRO-2/3 with overlap reduce each bucket after every micro-batch into its fp32 shard: the
    shards end equal to the summed gradients, and the full-size buffers exist only around their
    block's backward (a handful at a time, none after the step)."""
    import copy

    from llama3hp.model import Transformer
    from llama3hp.parallel.zero import ZeroDataParallel

    args = small_args()
    model = Transformer(args)
    model.init_weights(seed=0)
    ref = copy.deepcopy(model)
    dp = ZeroDataParallel([model], None, stage=stage, bucket_mb=0.01)  # ~one parameter per bucket
    assert len(dp.buckets) > 20 and not any(b.grad_allocated for b in dp.buckets)
    live = []
    for p in model.parameters():  # after the ZeRO hooks: how many full buffers are allocated now
        p.register_hook(lambda g: live.append(sum(b.grad_allocated for b in dp.buckets)))
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, args.vocab_size, (3, 2, 16), generator=g)
    dp.begin_step(3)
    for mb in range(3):
        model(tokens[mb], targets=tokens[mb].roll(-1, 1)).backward()
    dp.finish_grad_sync()
    for mb in range(3):
        ref(tokens[mb], targets=tokens[mb].roll(-1, 1)).backward()
    grads = dict(ref.named_parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    for b in dp.buckets:
        want = torch.cat([grads[names[id(p)]].grad.reshape(-1) for p in b.params])
        torch.testing.assert_close(b.shard.grad[: want.numel()], want, rtol=1e-5, atol=1e-7)
    assert not any(b.grad_allocated for b in dp.buckets)
    # The bucket receiving, MAX_INFLIGHT (2) reductions in flight, the block's norms (a bucket whose two
    # gradients arrive at the start and the end of the block's backward): 4 of 35 at most.
    assert 0 < max(live) <= 4, max(live)


def test_zero3_bf16_gathers_round_only_what_bf16_autocast_gemms_read():
    """ZeRO-3 with bf16 gathers: the blocks' matrices land bf16-rounded and everything else exact,
    and a step under bf16 autocast is bit-identical to fp32 gathers (the GEMMs cast to bf16 anyway)."""
    from llama3hp.model import Transformer
    from llama3hp.parallel.zero import ZeroDataParallel

    args = small_args()
    g = torch.Generator().manual_seed(12)
    tokens = torch.randint(0, args.vocab_size, (2, 16), generator=g)
    runs = {}
    for dt in (torch.float32, torch.bfloat16):
        model = Transformer(args)
        model.init_weights(seed=0)
        dp = ZeroDataParallel([model], None, stage=3, gather_dtype=dt)
        dp.begin_step(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(tokens, targets=tokens.roll(-1, 1))
        loss.backward()
        dp.finish_grad_sync()
        with dp.unsharded():  # what the gathers put in the parameters
            block = model.layers["0"]
            gathered = {n: p.detach().clone() for n, p in block.named_parameters()}
        runs[dt] = (loss.detach(), [b.shard.grad.clone() for b in dp.buckets], gathered, dp)
    (loss32, grads32, w32, _), (loss16, grads16, w16, dp16) = runs[torch.float32], runs[torch.bfloat16]
    assert torch.equal(loss16, loss32) and all(torch.equal(a, b) for a, b in zip(grads16, grads32))
    assert {b.gather_dtype for b in dp16.buckets} == {torch.float32, torch.bfloat16}
    for name, w in w16.items():
        if name.endswith("norm.weight"):
            assert torch.equal(w, w32[name]), name
        else:
            assert torch.equal(w, w32[name].to(torch.bfloat16).float()) and not torch.equal(w, w32[name]), (
                name
            )
