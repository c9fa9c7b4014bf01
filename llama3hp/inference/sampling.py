"""Sampling parameters of a request and the sampler that turns a step's logits into tokens.

Greedy at temperature 0; otherwise softmax(logits / temperature) restricted to the top_k most
likely tokens and to the smallest set whose probability reaches top_p, sampled by inverse CDF
with one uniform number per row drawn from that sequence's own `torch.Generator`. A request with
a `seed` therefore gets the same tokens whatever else shares its batches: sample i of a request
draws from a generator seeded by (seed, i). Without a seed the generator is seeded at random.

Shape legend: R rows being sampled (one per sequence that gets a token this step), V vocabulary.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from llama3hp.errors import UserError

MAX_STOP_STRINGS = 4


class SamplingError(UserError, ValueError):
    """A sampling parameter out of range (the server answers 400)."""


@dataclass
class SamplingParams:
    """What a request asks for (OpenAI's names)."""

    max_tokens: int = 16  # tokens to generate at most (finish_reason "length")
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus: the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # 0: the whole vocabulary
    n: int = 1  # independent samples of one prompt (they share its KV blocks)
    seed: int | None = None  # reproducible sampling, whatever the batch
    stop: list[str] = field(default_factory=list)  # up to 4 strings; generation ends before them
    ignore_eos: bool = False  # keep going past the end-of-turn/-text tokens (benchmarks)

    def validate(self) -> SamplingParams:
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (0.0 <= self.temperature <= 2.0, f"temperature must be in [0, 2], got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (isinstance(self.n, int) and 1 <= self.n <= 128, f"n must be in [1, 128], got {self.n}"),
            (self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}"),
            (len(self.stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]  # fmt: skip
        for ok, msg in checks:
            if not ok:
                raise SamplingError(msg)
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self, index: int) -> torch.Generator | None:
        """The CPU generator of sample `index` (None when greedy)."""
        if self.greedy:
            return None
        seed = random.getrandbits(63) if self.seed is None else (self.seed * 1_000_003 + index) % (1 << 63)
        return torch.Generator(device="cpu").manual_seed(seed)


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """One token per row of logits [R, V] (fp32), row i under params[i] with generators[i]."""
    R = logits.shape[0]
    if R == 0:
        return []
    out = logits.argmax(dim=-1)
    rand = [i for i, p in enumerate(params) if not p.greedy]
    if rand:
        idx = torch.tensor(rand, device=logits.device)
        x = logits.index_select(0, idx).float()
        temps = torch.tensor([params[i].temperature for i in rand], device=x.device)
        x = x / temps[:, None]
        ks = [params[i].top_k for i in rand]
        if any(0 < k < x.shape[1] for k in ks):
            k_max = max(k for k in ks if k > 0)
            top = x.topk(min(k_max, x.shape[1]), dim=-1).values  # [r, k_max], descending
            kth = torch.tensor([(k if 0 < k < x.shape[1] else top.shape[1]) - 1 for k in ks], device=x.device)
            threshold = top.gather(1, kth[:, None])
            keep_all = torch.tensor([not (0 < k < x.shape[1]) for k in ks], device=x.device)
            x = torch.where((x >= threshold) | keep_all[:, None], x, float("-inf"))
        probs = torch.softmax(x, dim=-1)
        u = torch.stack([torch.rand((), generator=generators[i]) for i in rand]).to(x.device)
        ps = torch.tensor([params[i].top_p for i in rand], device=x.device)
        if bool((ps < 1.0).any()):
            sorted_p, order = probs.sort(dim=-1, descending=True)
            before = sorted_p.cumsum(-1) - sorted_p  # probability of the tokens ranked above
            sorted_p = torch.where(before < ps[:, None], sorted_p, 0.0)  # the first token always stays
            cdf = sorted_p.cumsum(-1)
            pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=x.shape[1] - 1)
            chosen = order.gather(1, pick)[:, 0]
        else:
            cdf = probs.cumsum(-1)
            chosen = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=x.shape[1] - 1)[
                :, 0
            ]
        out = out.index_copy(0, idx, chosen)
    return out.tolist()
