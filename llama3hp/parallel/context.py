"""Context parallelism, the Llama 3 paper's way: all-gather K/V, keep queries local.

Each row of T tokens is cut into 2*cp chunks of c = T/(2cp); CP rank i holds chunks i and
2cp-1-i (an early and a late chunk, so every rank does the same causal-attention work). Attention
all-gathers K and V over the CP group (cheap with 8 KV heads) and attends the rank's queries to
every gathered key under the document mask, comparing GLOBAL positions; backward reduce-scatters
dK/dV. Packed documents of any length work: masks come from the global `cu_seqlens`, so a document
may cross chunk and rank borders. RoPE uses each local token's global document position.

Overlap (`overlap=True`, ParallelConfig.cp_overlap, the default). K/V of layer l+1 depend on layer
l's output, so the gather cannot run ahead across layers; it overlaps WITHIN the layer's attention:
1. launch the async all-gather of K and V (`StartAllGatherKV`);
2. while it is in flight, attend each of the rank's two chunks to its OWN keys (the causal diagonal
   block of each chunk, documents cut at chunk borders): needs no remote key, ~1/(2cp) of the
   keys a chunk sees on average, the most expensive blocks being masked;
3. wait (`WaitKV`), then attend each chunk to every key strictly before the chunk (its document's
   earlier tokens on any rank; chunk 0 has none and skips this);
4. merge the two partial results with their log-sum-exps (exact, not an approximation).
Backward mirrors it: the partial dK/dV of step 3 are reduce-scattered asynchronously (launched by
`WaitKV`'s backward) while autograd runs the diagonal attention's backward (its nodes were created
before `WaitKV`, so the engine reaches them before `StartAllGatherKV`'s backward, which waits).
Both paths compute the same softmax: results agree to float32 rounding.

Shape legend: B rows, T global row length, T_l = T/cp local tokens, H/Hk query/KV heads, Dh head dim.
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

import llama3hp.kernels as K
from llama3hp.data.batch import Batch
from llama3hp.kernels.attention import attention_varlen
from llama3hp.kernels.dispatch import use_triton
from llama3hp.model.rope import document_positions
from llama3hp.parallel.comm import (
    all_gather_single,
    group_rank,
    group_size,
    reduce_scatter_single,
)
from llama3hp.parallel.tp_comm import GatherFromSP


def cp_token_index(T: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Global row positions [T/cp] held by CP `rank`: chunk `rank`, then chunk 2cp-1-rank."""
    if T % (2 * cp):
        raise ValueError(f"row length {T} is not divisible by 2*cp = {2 * cp}: pick seq_len divisible by it")
    c = T // (2 * cp)
    ar = torch.arange(c, device=device)
    return torch.cat([rank * c + ar, (2 * cp - 1 - rank) * c + ar])


def shard_for_cp(x: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """The rank's load-balanced tokens of x [B, T, ...] -> [B, T/cp, ...]."""
    if cp == 1:
        return x
    return x[:, cp_token_index(x.shape[1], cp, rank, x.device)]


def shard_batch(batch: Batch, cp: int, rank: int, *, doc_positions: bool = True) -> Batch:
    """CP rank `rank`'s view of full rows [B, T]: its load-balanced tokens [B, T/cp] of inputs,
    targets and loss mask, their RoPE positions in the full rows (restarting per document when
    doc_positions) and their flat indices in the full rows (`token_index`); cu_seqlens stay global
    (one segment per row when the batch had none). With cp == 1 only the positions are added."""
    B, T = batch.inputs.shape
    dev = batch.inputs.device
    cu = batch.cu_seqlens
    pos = batch.positions
    if pos is None:
        use_cu = doc_positions or batch.doc_prefix is not None
        pos = document_positions(cu if use_cu else None, B, T, dev, batch.doc_prefix)
    if cp == 1:
        return dataclasses.replace(batch, positions=pos)
    if cu is None:
        cu = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=dev)
    idx = cp_token_index(T, cp, rank, dev)
    per_token = {  # every [B, T] field, cut to the rank's tokens
        f: getattr(batch, f)[:, idx] for f in Batch.PER_TOKEN if getattr(batch, f) is not None
    }
    return dataclasses.replace(
        batch,
        **per_token,
        positions=pos[:, idx],
        cu_seqlens=cu,
        max_seqlen=batch.max_seqlen or T,
        token_index=(torch.arange(B, device=dev)[:, None] * T + idx[None, :]),
    )


# Forward all-gather of K or V over CP along the sequence (rank order); backward reduce-scatter of
# the partial dK/dV each rank's queries produced back to the tokens' owners: the same
# communication as sequence parallelism's gather, so the same Function.
AllGatherKV = GatherFromSP


class StartAllGatherKV(torch.autograd.Function):
    """Forward: launch the async all-gather of K and V over CP into sequence-major buffers
    [T, B, Hk, Dh] that are valid only after `WaitKV`. Backward: wait for the reduce-scatters that
    `WaitKV`'s backward launched and return this rank's dK, dV [B, T_l, Hk, Dh]."""

    @staticmethod
    def forward(ctx, k, v, group, pending: list):
        cp = group_size(group)
        bufs = []
        for x in (k, v):
            xt = x.transpose(0, 1).contiguous()  # [T_l, B, Hk, Dh]: gathers along dim 0 in rank order
            out = xt.new_empty((cp * xt.shape[0], *xt.shape[1:]))
            pending.append(all_gather_single(out, xt, group=group, async_op=True))
            bufs.append(out)
        ctx.pending = pending
        return tuple(bufs)

    @staticmethod
    def backward(ctx, _gk, _gv):
        works, outs = ctx.pending
        for w in works:
            w.wait()
        return outs[0].transpose(0, 1), outs[1].transpose(0, 1), None, None


class WaitKV(torch.autograd.Function):
    """Forward: wait for `StartAllGatherKV`'s gathers (identity on the buffers). Backward: launch the
    async reduce-scatter of the gathered keys' gradients and pass them through."""

    @staticmethod
    def forward(ctx, k_buf, v_buf, group, pending: list):
        for w in pending:
            w.wait()
        pending.clear()
        ctx.group, ctx.pending = group, pending
        return k_buf.view_as(k_buf), v_buf.view_as(v_buf)

    @staticmethod
    def backward(ctx, gk, gv):
        cp = group_size(ctx.group)
        works, outs = [], []
        for g, like in ((gk, gv), (gv, gk)):
            g = torch.zeros_like(like) if g is None else g.contiguous()
            out = g.new_empty((g.shape[0] // cp, *g.shape[1:]))
            works.append(reduce_scatter_single(out, g, group=ctx.group, async_op=True))
            outs.append(out)
        ctx.pending[:] = [works, outs]
        return gk, gv, None, None


@dataclass(frozen=True)
class DocPiece:
    """Tokens [start, end) of one document: `doc` indexes cu_seqlens, `offset` is the position of
    `start` in that document."""

    start: int
    end: int
    doc: int
    offset: int


def split_at_documents(bounds: list[int], ranges: list[tuple[int, int]]) -> list[DocPiece]:
    """Half-open token ranges cut at document boundaries, in order (the one place CP segments are cut).

    bounds: cu_seqlens as ints [n_docs + 1] over N tokens (empty documents allowed: no piece lies in
    one). ranges: (start, end) pairs within [0, N].
    """
    n_tokens = bounds[-1]
    pieces = []
    for a, b in ranges:
        if not 0 <= a <= b <= n_tokens:
            raise ValueError(f"token range ({a}, {b}) is outside the {n_tokens} tokens of cu_seqlens")
        d = max(bisect.bisect_right(bounds, a) - 1, 0)
        while a < b:
            while bounds[d + 1] <= a:  # skip empty documents
                d += 1
            end = min(b, bounds[d + 1])
            pieces.append(DocPiece(a, end, d, a - bounds[d]))
            a = end
    return pieces


@dataclass(frozen=True)
class CPQuerySegments:
    """Query segments of one context-parallel rank, ready for `attention_varlen` over gathered K/V."""

    cu_seqlens_q: torch.Tensor  # int32 [S + 1], offsets into the rank's local queries
    q_doc_idx: torch.Tensor  # int32 [S], document (index into the global cu_seqlens) of each segment
    q_pos_offsets: torch.Tensor  # int32 [S], position of each segment's first query in its document
    max_seqlen_q: int  # longest segment


def build_cp_query_segments(cu_seqlens: torch.Tensor, q_ranges: list[tuple[int, int]]) -> CPQuerySegments:
    """Split a rank's query token ranges at document boundaries (the non-overlapped CP path).

    cu_seqlens: int [n_docs + 1], documents over the N gathered (global, packed) tokens.
    q_ranges: half-open global token ranges the rank holds, in local order (with the paper's CP,
    chunks i and 2cp-1-i of each row). Pass the result with k/v = the gathered tokens and
    cu_seqlens_k = cu_seqlens, max_seqlen_k = the longest document.
    """
    pieces = split_at_documents([int(x) for x in cu_seqlens.tolist()], q_ranges)
    cu_q = [0]
    for p in pieces:
        cu_q.append(cu_q[-1] + p.end - p.start)
    t = lambda x: torch.tensor(x, dtype=torch.int32, device=cu_seqlens.device)
    return CPQuerySegments(
        cu_seqlens_q=t(cu_q),
        q_doc_idx=t([p.doc for p in pieces]),
        q_pos_offsets=t([p.offset for p in pieces]),
        max_seqlen_q=max((p.end - p.start for p in pieces), default=0),
    )


# (cu_q, cu_k, q_doc, q_pos, max_q, max_k) of one chunk's queries over the gathered keys.
RemoteSegments = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int, int]


@dataclass
class CPSplitSegments:
    """Varlen segments of one CP rank's split attention (host-built once per micro-batch).

    local_cu: int32 [n + 1] documents cut at chunk borders over the rank's B*T_l local tokens (the
    diagonal part: self-attention inside each piece). remote[j] for j in (0, 1) (the rank's early and
    late chunk): None when the chunk has no earlier keys, else (cu_q, cu_k, q_doc, q_pos, max_q,
    max_k) for the chunk's B*c queries over the B*T gathered keys in global order, each query segment
    pointed at its document's keys before the chunk (an empty key document when it has none).
    """

    local_cu: torch.Tensor
    max_local: int
    remote: list[RemoteSegments | None] = field(default_factory=list)
    remote_has_keys: bool = True  # False when every document of the rank starts inside its chunk


def build_cp_split_segments(
    cu_seqlens: torch.Tensor | None, B: int, T: int, cp: int, rank: int, device=None
) -> CPSplitSegments:
    """Segments for `cp_attention_split` (see CPSplitSegments); cu_seqlens over the global B*T tokens."""
    c = T // (2 * cp)
    bounds = list(range(0, B * T + 1, T)) if cu_seqlens is None else [int(x) for x in cu_seqlens.tolist()]
    slots = (rank, 2 * cp - 1 - rank)
    local_cu, longest = [0], 1
    for p in split_at_documents(
        bounds, [(row * T + j * c, row * T + (j + 1) * c) for row in range(B) for j in slots]
    ):
        local_cu.append(local_cu[-1] + p.end - p.start)
        longest = max(longest, p.end - p.start)
    remote: list[RemoteSegments | None] = []
    has_keys = False
    for j in slots:
        if j == 0:
            remote.append(None)
            continue
        cuts = [row * T + j * c for row in range(B)]
        cu_k = sorted(set(bounds) | set(cuts))
        cu_k.append(cu_k[-1])  # a trailing empty key document for queries with no earlier keys
        empty = len(cu_k) - 2
        index = {s: i for i, s in enumerate(cu_k[:-1])}
        cu_q, q_doc, q_pos, max_q = [0], [], [], 1
        for p in split_at_documents(bounds, [(cut, cut + c) for cut in cuts]):
            cu_q.append(cu_q[-1] + p.end - p.start)
            max_q = max(max_q, p.end - p.start)
            # Only a chunk's first piece can start inside a document (offset > 0); its key document is
            # that document cut at the chunk: the keys before the chunk.
            q_doc.append(index[bounds[p.doc]] if p.offset > 0 else empty)
            has_keys |= p.offset > 0
            q_pos.append(T)  # past every key of the (cut) document: all visible, none masked
        max_k = max([e - s for s, e in zip(cu_k[:-1], cu_k[1:])] + [1])
        t = lambda x: torch.tensor(x, dtype=torch.int32, device=device)
        remote.append((t(cu_q), t(cu_k), t(q_doc), t(q_pos), max_q, max_k))
    return CPSplitSegments(
        torch.tensor(local_cu, dtype=torch.int32, device=device), longest, remote, has_keys
    )


class AttachKV(torch.autograd.Function):
    """Forward: identity on out. Backward: also zero gradients for k, v, so the gather's backward
    (a collective every CP rank must join) runs even when no query of this rank saw a remote key."""

    @staticmethod
    def forward(ctx, out, k, v):
        ctx.kv = (k.shape, k.dtype, k.device)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g):
        shape, dtype, device = ctx.kv
        z = torch.zeros(shape, dtype=dtype, device=device)
        return g, z, z.clone()


def cp_attention_split(q, k, v, remote_kv, segs: CPSplitSegments, cp: int, backend: str) -> torch.Tensor:
    """CP attention as diagonal + remote parts merged by log-sum-exp (the overlapped form).

    q: [B, T_l, H, Dh]; k, v: [B, T_l, Hk, Dh] local; remote_kv(): -> (k_all, v_all) [B, T, Hk, Dh]
    gathered in rank-major order, called only after the diagonal part is issued (it may block on the
    all-gather). Returns [B, T_l, H, Dh], equal to `cp_attention_masked` up to fp32 rounding.
    """
    B, Tl, H, Dh = q.shape
    Hk, T, c = k.shape[2], Tl * cp, Tl // 2
    qf = q.reshape(B * Tl, H, Dh)
    o1, l1 = attention_varlen(
        qf, k.reshape(B * Tl, Hk, Dh), v.reshape(B * Tl, Hk, Dh), segs.local_cu, segs.local_cu,
        segs.max_local, segs.max_local, return_lse=True, backend=backend,
    )  # fmt: skip
    k_all, v_all = remote_kv()
    order = torch.argsort(torch.cat([cp_token_index(T, cp, r, q.device) for r in range(cp)]))
    k_g = k_all[:, order].reshape(B * T, Hk, Dh)
    v_g = v_all[:, order].reshape(B * T, Hk, Dh)
    o2s, l2s = [], []
    for slot, seg in enumerate(segs.remote):
        if seg is None:  # the row's first chunk: nothing before it
            o2s.append(q.new_zeros(B, c, H, Dh))
            l2s.append(torch.full((H, B, c), float("-inf"), dtype=torch.float32, device=q.device))
            continue
        cu_q, cu_k, q_doc, q_pos, max_q, max_k = seg
        qj = q[:, slot * c : (slot + 1) * c].reshape(B * c, H, Dh)
        o, lse = attention_varlen(
            qj, k_g, v_g, cu_q, cu_k, max_q, max_k, q_doc_idx=q_doc, q_pos_offsets=q_pos,
            return_lse=True, backend=backend,
        )  # fmt: skip
        o2s.append(o.view(B, c, H, Dh))
        l2s.append(lse.view(H, B, c))
    o2 = torch.cat(o2s, dim=1).reshape(B * Tl, H, Dh)
    l2 = torch.cat(l2s, dim=2).reshape(H, B * Tl)
    # Every query sees itself in the diagonal part, so the merged lse is finite; rows with no earlier
    # key have l2 = -inf and weight exactly 0 (logaddexp's gradient there is 0 as well, never NaN).
    lse = torch.logaddexp(l1, l2)
    w1 = torch.exp(l1 - lse).T[:, :, None]
    w2 = torch.exp(l2 - lse).T[:, :, None]
    out = (o1.float() * w1 + o2.float() * w2).to(q.dtype).view(B, Tl, H, Dh)
    if not segs.remote_has_keys:  # nothing above depends on k_all, v_all: keep the gather in the graph
        out = AttachKV.apply(out, k_all, v_all)
    return out


@dataclass
class CPComm:
    """The CP group; `attention` is what ParallelAttention calls instead of kernels.attention."""

    group: dist.ProcessGroup | None = None
    overlap: bool = True  # split attention so the K/V all-gather runs under the diagonal blocks
    _segs_key: tuple | None = field(default=None, repr=False)
    _segs: CPSplitSegments | None = field(default=None, repr=False)

    @property
    def size(self) -> int:
        return group_size(self.group)

    @property
    def rank(self) -> int:
        return group_rank(self.group)

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        backend: str,
        doc_prefix: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: [B, T_l, H, Dh]; k, v: [B, T_l, Hk, Dh] local; cu_seqlens: int32 over the GLOBAL B*T tokens;
        doc_prefix: int [n_docs] shared prefixes of its documents, or None. Returns [B, T_l, H, Dh].

        Shared-prefix batches (DPO's shared-prompt packing) take the gather-first path: a response's
        keys are then its prompt plus its own tokens before it, which the split's diagonal/remote cut
        does not express (a prompt cut by a chunk border would span two of its key documents)."""
        if self.overlap and doc_prefix is None:
            return self._attention_overlapped(q, k, v, cu_seqlens, backend)
        k_all = AllGatherKV.apply(k.contiguous(), self.group)  # [B, T, Hk, Dh], rank-major order
        v_all = AllGatherKV.apply(v.contiguous(), self.group)
        if use_triton(backend, q, k, v):
            return _cp_attention_varlen(
                q, k_all, v_all, cu_seqlens, self.size, self.rank, backend, doc_prefix
            )
        return cp_attention_masked(q, k_all, v_all, cu_seqlens, self.size, self.rank, doc_prefix)

    def _attention_overlapped(self, q, k, v, cu_seqlens, backend: str) -> torch.Tensor:
        B, Tl = q.shape[:2]
        # Every layer of a micro-batch sees the same cu_seqlens object: build its segments once (holding
        # the object keeps its id from being reused).
        key = (cu_seqlens, B, Tl)
        if self._segs_key is None or self._segs_key[0] is not cu_seqlens or self._segs_key[1:] != key[1:]:
            self._segs = build_cp_split_segments(
                cu_seqlens, B, Tl * self.size, self.size, self.rank, q.device
            )
            self._segs_key = key
        pending: list = []
        k_buf, v_buf = StartAllGatherKV.apply(k, v, self.group, pending)

        def remote_kv():
            kb, vb = WaitKV.apply(k_buf, v_buf, self.group, pending)
            return kb.transpose(0, 1), vb.transpose(0, 1)

        assert self._segs is not None
        return cp_attention_split(q, k, v, remote_kv, self._segs, self.size, backend)


def cp_attention_masked(q, k_all, v_all, cu_seqlens, cp: int, rank: int, doc_prefix=None) -> torch.Tensor:
    """Plain-PyTorch CP attention: SDPA over (local queries x gathered keys) with an explicit boolean
    document-and-causal mask by global position (plus each document's shared prefix, all visible).
    q: [B, T_l, H, Dh]; k_all, v_all: [B, T, Hk, Dh]."""
    B, Tl = q.shape[:2]
    T = k_all.shape[1]
    q_idx = cp_token_index(T, cp, rank, q.device)
    k_idx = torch.cat([cp_token_index(T, cp, r, q.device) for r in range(cp)])
    mask = k_idx[None, None, :] <= q_idx[None, :, None]  # [1, T_l, T]
    if cu_seqlens is not None:
        doc = K.document_ids(cu_seqlens, B * T).view(B, T)
        mask = mask & (doc[:, q_idx][:, :, None] == doc[:, k_idx][:, None, :])
        if doc_prefix is not None:
            prefix = doc_prefix.to(device=doc.device, dtype=doc.dtype)[doc]
            mask = mask | (prefix[:, q_idx][:, :, None] == doc[:, k_idx][:, None, :])
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2), attn_mask=mask[:, None],
        enable_gqa=q.shape[2] != k_all.shape[2],
    )  # fmt: skip
    return out.transpose(1, 2)


def _cp_attention_varlen(q, k_all, v_all, cu_seqlens, cp: int, rank: int, backend: str, doc_prefix=None):
    """The same attention through the varlen kernel with query position offsets (CUDA path): gathered
    keys are put back in global order and each local chunk is a query segment of its document(s)."""
    B, Tl, H, Dh = q.shape
    T = k_all.shape[1]
    k_idx = torch.cat([cp_token_index(T, cp, r, q.device) for r in range(cp)])
    order = torch.argsort(k_idx)
    k_g = k_all[:, order].reshape(B * T, -1, Dh)
    v_g = v_all[:, order].reshape(B * T, -1, Dh)
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=q.device)
    c = T // (2 * cp)
    ranges = [(b * T + j * c, b * T + (j + 1) * c) for b in range(B) for j in (rank, 2 * cp - 1 - rank)]
    seg = build_cp_query_segments(cu_seqlens, ranges)
    max_k = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    out = attention_varlen(
        q.reshape(B * Tl, H, Dh), k_g, v_g, seg.cu_seqlens_q, cu_seqlens, seg.max_seqlen_q, max_k,
        q_doc_idx=seg.q_doc_idx, q_pos_offsets=seg.q_pos_offsets, doc_prefix=doc_prefix, backend=backend,
    )  # fmt: skip
    return out.view(B, Tl, H, Dh)
