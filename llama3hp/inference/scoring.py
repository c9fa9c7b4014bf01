"""Scoring (prompt, response) texts with a reward model: what rejection sampling and `/v1/score` call.

    scorer = RewardScorer.load("runs/tiny_reward-<stamp>")     # a checkpoint with model.head=reward
    scorer.score([("Say hi", ["Hello!", "Go away."])])          # -> [[r1, r2]]

Each prompt is encoded as training encodes a preference row (`llama3hp.data.chat`: the Llama 3 chat
format up to the open assistant header, an optional system message first) and each response as its
text then <|eot_id|>; the score is the reward head's value at that last token. The responses of one
prompt are packed after it as the reward model was trained ([prompt[:-1] | prompt[-1] response_1 |
... ], each response attending to the shared prompt and never to another response:
`llama3hp.data.examples.response_segments`), so the prompt is computed once for all of them; prompts
go into one packed row until `max_batch_tokens`, one forward pass per row, no KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llama3hp.data.examples import Segment, build_batch, response_segments
from llama3hp.data.tokenizer import ChatFormat, Tokenizer
from llama3hp.errors import UsageError
from llama3hp.model.llama import Transformer
from llama3hp.posttrain.reward import response_scores

Prompt = str | Sequence[dict[str, Any]]  # a user message, or the messages before the reply


def prompt_messages(prompt: Prompt, system: str | None = None) -> list[dict[str, Any]]:
    """The chat messages of a prompt (a string is one user message), with `system` first if given."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and not (msgs and msgs[0].get("role") == "system"):
        msgs = [{"role": "system", "content": system}, *msgs]
    return msgs


class RewardScorer:
    """A reward model in eval mode and its tokenizer (module docstring)."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, max_batch_tokens: int = 8192):
        if model.args.head != "reward":
            raise UsageError("this checkpoint is a language model, not a reward model (model.head=reward)")
        self.model, self.tokenizer, self.chat = model, tokenizer, ChatFormat(tokenizer)
        self.max_batch_tokens = max(max_batch_tokens, 2)
        self.device = next(model.parameters()).device

    @classmethod
    def load(
        cls, path: str | Path, *, device: torch.device | None = None, dtype: torch.dtype | None = None,
        max_batch_tokens: int = 8192, tokenizer_path: str | None = None,
    ) -> RewardScorer:  # fmt: skip
        from llama3hp.inference.loading import load_serving_model

        return cls(
            load_serving_model(path, device=device, dtype=dtype),
            Tokenizer.load(tokenizer_path),
            max_batch_tokens=max_batch_tokens,
        )

    def encode(self, prompt: Prompt, responses: Sequence[str], system: str | None = None):
        """(prompt ids, [response ids]): the prompt through the open assistant header; each response's
        text then <|eot_id|> (an empty response is <|eot_id|> alone)."""
        ids, _ = self.chat.encode_dialog_with_mask(
            prompt_messages(prompt, system), add_generation_prompt=True
        )
        eot = self.tokenizer.eot_id
        return ids, [self.tokenizer.encode(r.strip()) + [eot] for r in responses]

    def score(
        self, groups: Sequence[tuple[Prompt, Sequence[str]]], system: str | None = None
    ) -> list[list[float]]:
        """For each (prompt, responses) the responses' scores, in order."""
        return self.score_ids([self.encode(p, rs, system) for p, rs in groups])

    @torch.no_grad()
    def score_ids(self, groups: Sequence[tuple[list[int], list[list[int]]]]) -> list[list[float]]:
        """score() on token ids: (prompt ids, [response ids]) per group."""
        limit = self.model.args.max_seq_len
        out: list[list[float]] = [[] for _ in groups]
        row: list[int] = []
        used = 0
        for g, (p, rs) in enumerate(groups):
            n = len(p) + sum(len(r) for r in rs)
            if n > limit:
                raise UsageError(
                    f"prompt {g}: {n} tokens with its {len(rs)} responses, more than the reward model's "
                    f"context of {limit}: score fewer responses at once or shorter ones"
                )
            if row and used + n > self.max_batch_tokens:
                self._run(groups, row, out)
                row, used = [], 0
            row.append(g)
            used += n
        if row:
            self._run(groups, row, out)
        return out

    def _run(self, groups, row: list[int], out: list[list[float]]) -> None:
        """One packed row of the groups `row` through the model; their scores into `out`."""
        examples: list[tuple[list[Segment], int | None]] = []
        first, segment = [], 0
        for g in row:
            p, rs = groups[g]
            zeros = [np.zeros(len(r), np.uint8) for r in rs]
            segs = response_segments(
                np.asarray(p, np.int64), np.zeros(len(p), np.uint8),
                [(np.asarray(r, np.int64), z) for r, z in zip(rs, zeros)], shared_prompt=True,
            )  # fmt: skip
            examples.append((segs, None))
            first.append(segment + 1)  # the prompt, then the responses
            segment += len(segs)
        T = sum(s.ids.size for segs, _ in examples for s in segs)
        b = build_batch([examples], T, preference=True, shared_prompt=True).to(self.device)
        h = self.model(b.inputs, cu_seqlens=b.cu_seqlens, max_seqlen=b.max_seqlen, doc_prefix=b.doc_prefix)
        scores = response_scores(h, b).tolist()
        for g, f in zip(row, first):
            out[g] = scores[f : f + len(groups[g][1])]
