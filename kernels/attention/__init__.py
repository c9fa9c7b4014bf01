"""Causal attention with a document mask over packed rows, grouped-query heads.

Documents are given as `cu_seqlens`: int32 offsets [n_docs + 1] into the B*T flattened tokens of
the batch (0, len_0, len_0 + len_1, ..., B*T); a document never crosses a row. A token attends
to the tokens of its own document up to itself, never across documents. `cu_seqlens=None`
means one document per row (plain causal attention).

Varlen form (`attention_varlen`, what context parallelism calls). Tensors are packed tokens:
q [Nq, Hq, D], k/v [Nk, Hk, D]. Keys come in key documents `cu_seqlens_k` [Dk + 1] (cumulative
over the Nk keys; a key at index i of its document has position i). Queries come in query
segments `cu_seqlens_q` [S + 1] (cumulative over the Nq queries); segment s belongs to key
document `q_doc_idx[s]` (default s) and its j-th query has position `q_pos_offsets[s] + j` in that
document (default Lk - Lq: bottom-right aligned, i.e. 0 for self-attention). A query at position
p attends to the keys of its document at positions <= p. Several segments may share one key
document: a context-parallel rank holding chunks i and 2cp-1-i of a sequence passes both as
segments of the same document over the all-gathered keys
(`llama3hp.parallel.context.build_cp_query_segments`).

Shared prefixes (`doc_prefix`, one int per key document, -1 for none): a document may name an
earlier document whose keys ALL its queries also see. A DPO pair packed as one row piece
[prompt | chosen | rejected] makes prompt, chosen and rejected three documents, the two responses
naming the prompt: the prompt is computed once, and the rejected tokens attend to the prompt and
to themselves, never to the chosen ones. The forward and dQ kernels run the prefix's keys before
the document's own (unmasked but for the last block); dK/dV of a prefix key block also sums over the
query segments of the documents using it (a CSR of users built on device).

Kernels (FlashAttention-2 style, fp32 accumulators, `tl.dot` on the input dtype):
- `_attn_fwd_kernel`: grid (query block, segment, q head); online softmax in base 2; the key loop
  runs over [0, min(Lk, last query position + 1)) only, so work grows with sum(L^2) over documents,
  and only the key blocks that straddle the diagonal evaluate the causal mask.
- `_attn_bwd_preprocess_kernel`: delta = rowsum(dO * O) (minus dLSE when the LSE has a gradient).
- `_attn_bwd_dkdv_kernel`: grid (key block, key document, kv head); loops over every query
  segment of its document and every q head of its GQA group, so dK/dV for a kv head are summed in
  registers (no expanded K/V, no atomics). With ATOMIC_DQ it also adds dS @ K into an fp32 dQ
  buffer with atomics (5 GEMMs per tile instead of 7; order-dependent rounding).
- `_attn_bwd_dq_kernel`: grid like the forward; recomputes P and dP to form dQ without atomics
  (`deterministic=True`: bit-identical gradients run to run).

Shape legend: Nq/Nk packed query/key tokens, Hq/Hk query/kv heads, D head dim, S query segments,
Dk key documents. LSE is the natural-log log-sum-exp of the scaled scores, fp32 [Hq, Nq].

The package, one job per module (the kernel triad: kernels, Function and references live here together):
- `reference.py`: `attention_ref`, `attention_varlen_ref`, `document_ids` (plain PyTorch);
- `checks.py`: argument checks shared by the references and the kernel path;
- `tiles.py`: the H100 tile candidates per kernel and head-dim class, their pruner, the autotune key;
- `common.py`: what forward and backward share (the jit prologue locating a program's rows and keys,
  output buffers);
- `forward.py`: `_attn_fwd_kernel` and its launcher;
- `backward.py`: the preprocess, dK/dV and dQ kernels and their launcher;
- `api.py`: `AttentionFunction`, `attention`, `attention_varlen`.
"""

from llama3hp.kernels.attention.api import AttentionFunction, attention, attention_varlen
from llama3hp.kernels.attention.reference import attention_ref, attention_varlen_ref, document_ids

__all__ = [
    "AttentionFunction",
    "attention",
    "attention_ref",
    "attention_varlen",
    "attention_varlen_ref",
    "document_ids",
]
