"""Rejection sampling: k responses per prompt from the policy, the reward model keeps the best.

    llama3hp rejection-sample --policy CKPT --reward CKPT --prompts FILE.jsonl --k 16 --out FILE.jsonl

The paper's step between the reward model and SFT: for every prompt, k samples (10-30 in the paper)
from the latest policy through the serving engine (`llama3hp.inference.LLMEngine`: one request with
n = k, whose samples share the prompt's KV blocks copy-on-write, so the prompt is prefilled once;
`share_prompt=False` submits k requests instead, the baseline of `benchmarks/bench_rejection.py`),
scored in packed batches by the reward model (`llama3hp.inference.scoring.RewardScorer`, the prompt
computed once for its k responses), and one SFT row per prompt written with the best response:

    {"messages": [..., {"role": "assistant", "content": best}], "id": ..., "prompt_index": i,
     "reward": r(best), "run": ..., ["candidates": [{"text", "reward", "finish_reason"}, ...]]}

which `llama3hp prepare --format sft` reads as is.

Prompts file: JSONL rows with "prompt" (a string or messages) or "messages" (a conversation; a
trailing assistant turn, as in an SFT row, is dropped), and an optional "id"; other keys (a
preference row's chosen/rejected) are ignored. A system prompt (`system`) steering tone and format
goes before each prompt's messages.

Resumable: rows are appended one at a time and fsync'd; each carries the prompt's line index and a
key of this run (the checkpoints' and prompts' hashes and every sampling setting). A restarted run
reads the file, cuts a torn last line, refuses a file holding another run's rows, and samples only
the prompts not yet written: a prompt is never written twice. Sample j of prompt i draws from its own
seed (`seed`, i, j), so a resumed run writes what an uninterrupted one would have.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llama3hp.errors import UserError

K_RANGE = (1, 30)  # the paper samples 10-30 responses per prompt


class RejectionError(UserError, ValueError):
    """Bad rejection-sampling input: prompts, checkpoints, k, the output file (one line)."""


@dataclass
class RejectionConfig:
    policy: str
    reward: str
    prompts: str
    out: str
    k: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    system: str | None = None
    seed: int = 0
    keep_candidates: bool = False  # also write every candidate with its score
    limit: int | None = None  # only the first `limit` prompts
    prompts_per_batch: int = 8  # prompts whose k samples are generated together
    share_prompt: bool = True  # one request with n = k (shared prompt blocks) vs k requests
    device: str = "auto"
    kv_memory_gib: float | None = None
    max_score_tokens: int = 8192  # tokens per packed reward-model forward

    def validate(self) -> RejectionConfig:
        lo, hi = K_RANGE
        if not lo <= self.k <= hi:
            raise RejectionError(f"--k must be in [{lo}, {hi}] (the paper samples 10-30), got {self.k}")
        if not 0.0 < self.temperature <= 2.0:
            raise RejectionError(
                f"--temperature must be in (0, 2] (k samples need randomness), got {self.temperature}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise RejectionError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1 or self.prompts_per_batch < 1:
            raise RejectionError("--max-tokens and --prompts-per-batch must be >= 1")
        if self.limit is not None and self.limit < 1:
            raise RejectionError(f"--limit must be >= 1, got {self.limit}")
        for what, path in (("--policy", self.policy), ("--reward", self.reward), ("--prompts", self.prompts)):
            if not Path(path).exists():
                raise RejectionError(f"{what} not found: {path}")
        return self


@dataclass
class PromptRow:
    index: int  # 0-based index of the row among the file's non-blank lines
    messages: list[dict[str, Any]]
    id: Any


def read_prompts(path: str | Path, limit: int | None = None) -> list[PromptRow]:
    """The prompts of a JSONL file; a bad row is a one-line error naming the file and line."""
    from llama3hp.data.chat import ROLES

    rows: list[PromptRow] = []
    try:
        lines = Path(path).read_bytes().split(b"\n")
    except OSError as e:
        raise RejectionError(f"cannot read prompts file {path}: {e.strerror}") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {n}"
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RejectionError(f"{where} is not valid JSON; fix or remove that line") from None
        if not isinstance(row, dict) or ("prompt" not in row and "messages" not in row):
            raise RejectionError(f'{where}: a prompt row needs "prompt" (a string or messages) or "messages"')
        value = row.get("prompt", row.get("messages"))
        if isinstance(value, str):
            if not value.strip():
                raise RejectionError(f"{where}: empty prompt")
            messages = [{"role": "user", "content": value}]
        elif isinstance(value, list) and value:
            messages = list(value)
            if messages[-1].get("role") == "assistant" if isinstance(messages[-1], dict) else False:
                messages = messages[:-1]  # an SFT row: the prompt is what precedes the reply
            for i, m in enumerate(messages):
                if not (isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ROLES):
                    raise RejectionError(
                        f"{where}: message {i} must be an object with a role ({', '.join(ROLES)}) and string content"
                    )
            if not messages or messages[-1]["role"] == "assistant":
                raise RejectionError(f"{where}: the prompt must end with a user (or tool) message")
        else:
            raise RejectionError(f"{where}: the prompt must be a non-empty string or list of messages")
        rows.append(PromptRow(len(rows), messages, row.get("id", len(rows))))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise RejectionError(f"prompts file {path} holds no prompts")
    return rows


def _file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def checkpoint_identity(path: str | Path) -> tuple[Any, str, str]:
    """(model args, tokenizer sha256, a hash of the weights) of a checkpoint of any format."""
    from llama3hp.data.tokenizer import Tokenizer
    from llama3hp.inference.loading import checkpoint_format

    fmt = checkpoint_format(path)
    if fmt == "llama3hp":
        from llama3hp.config import model_args_from_dict
        from llama3hp.posttrain.reference import checkpoint_sha256
        from llama3hp.train import checkpoint as ckpt

        meta = ckpt.read_train_state(path)
        if "model_args" not in meta:
            raise RejectionError(f"checkpoint {path} stores no model args")
        tok_path = (meta.get("config") or {}).get("data", {}).get("tokenizer_path")
        try:
            tok = Tokenizer.load(tok_path)
        except Exception:  # the tokenizer file of another machine: its hash cannot be checked here
            raise RejectionError(
                f"checkpoint {path} names a tokenizer that cannot be loaded: {tok_path}"
            ) from None
        return model_args_from_dict(meta["model_args"]), tok.sha256, checkpoint_sha256(path)
    from llama3hp.model.convert import args_from_hf_config, args_from_meta_params

    # The architecture from the folder's config alone: the weights are not read to check a pair.
    config, read = (
        ("config.json", args_from_hf_config) if fmt == "hf" else ("params.json", args_from_meta_params)
    )
    args = read(json.loads((Path(path) / config).read_text()))
    files = sorted(p for p in Path(path).iterdir() if p.suffix == ".json")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()
    return args, Tokenizer.load().sha256, digest


def check_pair(policy: str, reward: str) -> tuple[str, str, str]:
    """One-line errors unless the policy is a language model and the reward a reward model with the
    same tokenizer and vocabulary; returns (policy hash, reward hash, tokenizer sha256)."""
    p_args, p_tok, p_hash = checkpoint_identity(policy)
    r_args, r_tok, r_hash = checkpoint_identity(reward)
    if p_args.head != "lm":
        raise RejectionError(f"--policy {policy} is a reward model: sample from a language model")
    if r_args.head != "reward":
        raise RejectionError(f"--reward {reward} is a language model, not a reward model (model.head=reward)")
    if p_tok != r_tok:
        raise RejectionError(
            f"the policy and the reward model use different tokenizers ({p_tok[:12]} vs {r_tok[:12]}): "
            "train the reward model on the policy's tokenizer"
        )
    if p_args.vocab_size != r_args.vocab_size:
        raise RejectionError(
            f"the policy and the reward model have different vocabularies ({p_args.vocab_size} vs "
            f"{r_args.vocab_size} tokens): train the reward model from the policy's family"
        )
    return p_hash, r_hash, p_tok


class Output:
    """The append-only output file and its resume index (module docstring)."""

    def __init__(self, path: str | Path, run_key: str):
        self.path, self.run_key = Path(path), run_key
        self.done: set[int] = set()
        if self.path.is_dir():
            raise RejectionError(f"--out {self.path} is a folder: give a .jsonl file")
        if self.path.exists():
            self._read()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "ab")

    def _read(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a row cut by a kill mid-write: dropped, its prompt is sampled again
            with open(self.path, "r+b") as f:
                f.truncate(end)
        for n, line in enumerate(data[:end].split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise RejectionError(
                    f"--out {self.path} line {n} is not valid JSON: not a rejection-sample output"
                ) from None
            if not isinstance(row, dict) or row.get("run") != self.run_key:
                raise RejectionError(
                    f"--out {self.path} already holds rows of another run (other checkpoints, prompts or settings): "
                    "give another --out, or delete the file to start over"
                )
            self.done.add(int(row["prompt_index"]))

    def write(self, row: dict[str, Any]) -> None:
        if row["prompt_index"] in self.done:
            raise AssertionError(f"prompt {row['prompt_index']} written twice")
        self._f.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
        self._f.flush()
        os.fsync(self._f.fileno())
        self.done.add(row["prompt_index"])

    def close(self) -> None:
        self._f.close()


@dataclass
class Summary:
    prompts: int = 0  # written by this invocation
    skipped_done: int = 0  # already in the output (resume)
    skipped_empty: int = 0  # every sample empty: nothing to keep (sampled again on a rerun)
    responses: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    mean_reward_best: float = math.nan  # of the kept responses
    mean_reward_random: float = math.nan  # of one random sample per prompt (what k = 1 would keep)
    mean_reward_all: float = math.nan  # of every sample
    kv_blocks_peak: int = 0

    @property
    def responses_per_s(self) -> float:
        return self.responses / self.seconds if self.seconds else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "responses_per_s": self.responses_per_s,
                "tokens_per_s": self.generated_tokens / self.seconds if self.seconds else math.nan}  # fmt: skip


def run_key(cfg: RejectionConfig, policy_hash: str, reward_hash: str) -> str:
    settings = {
        "policy": policy_hash, "reward": reward_hash, "prompts": _file_sha256(cfg.prompts), "k": cfg.k,
        "temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens, "system": cfg.system,
        "seed": cfg.seed, "candidates": cfg.keep_candidates,
    }  # fmt: skip
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def sample_groups(engine, prompts: list[list[int]], cfg: RejectionConfig, seeds: list[int], tokenizer):
    """k GenerationResults per prompt: one request of n = k (prompt blocks shared) or k requests."""
    from llama3hp.inference.sampling import SamplingParams

    def params(n: int, seed: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p, n=n, seed=seed
        )

    if cfg.share_prompt:
        return engine.generate(prompts, [params(cfg.k, s) for s in seeds], tokenizer)
    flat = engine.generate(
        [p for p in prompts for _ in range(cfg.k)],
        [params(1, s * 1_000_003 + j) for s in seeds for j in range(cfg.k)], tokenizer,
    )  # fmt: skip
    return [[flat[i * cfg.k + j][0] for j in range(cfg.k)] for i in range(len(prompts))]


def build_engine(path: str, cfg: RejectionConfig):
    from llama3hp.inference.build import ServeOptions
    from llama3hp.inference.build import build_engine as build

    opts = ServeOptions(path, device=cfg.device, kv_memory_gib=cfg.kv_memory_gib, cuda_graphs=True).validate()
    return build(opts)


def rejection_sample(
    cfg: RejectionConfig, *, progress: bool | None = None, engine=None, scorer=None
) -> Summary:
    """Run rejection sampling (module docstring); `engine` and `scorer` may be given prebuilt (tests,
    the benchmark), else they are loaded from cfg.policy and cfg.reward."""
    from llama3hp.data.tokenizer import ChatFormat, Tokenizer
    from llama3hp.inference.scoring import RewardScorer

    cfg.validate()
    prompts = read_prompts(cfg.prompts, cfg.limit)
    policy_hash, reward_hash, tok_sha = check_pair(cfg.policy, cfg.reward)
    tokenizer = Tokenizer.load()
    if tokenizer.sha256 != tok_sha:
        raise RejectionError(
            "the checkpoints use another tokenizer than the packaged Llama 3 one: not supported"
        )
    out = Output(cfg.out, run_key(cfg, policy_hash, reward_hash))
    todo = [p for p in prompts if p.index not in out.done]
    summary = Summary(skipped_done=len(prompts) - len(todo))
    chat = ChatFormat(tokenizer)
    try:
        if todo:
            engine = engine or build_engine(cfg.policy, cfg)
            if scorer is None:
                scorer = RewardScorer.load(
                    cfg.reward, device=engine.device, max_batch_tokens=cfg.max_score_tokens
                )
        _loop(cfg, todo, engine, scorer, chat, out, summary, progress)
    finally:
        out.close()
    return summary


def _loop(cfg, todo, engine, scorer, chat, out: Output, summary: Summary, progress) -> None:
    from tqdm import tqdm

    from llama3hp.inference.scoring import prompt_messages

    bar = tqdm(total=len(todo), unit="prompt", disable=not (sys.stderr.isatty() if progress is None else progress),
               file=sys.stderr)  # fmt: skip
    rng = random.Random(cfg.seed)
    best_sum = random_sum = all_sum = 0.0
    n_all = 0
    start = time.perf_counter()
    for s in range(0, len(todo), cfg.prompts_per_batch):
        batch = todo[s : s + cfg.prompts_per_batch]
        messages = [prompt_messages(p.messages, cfg.system) for p in batch]
        ids = [chat.encode_dialog_prompt(m, add_generation_prompt=True) for m in messages]
        results = sample_groups(
            engine, ids, cfg, [cfg.seed * 1_000_003 + p.index for p in batch], chat.tokenizer
        )
        summary.kv_blocks_peak = max(summary.kv_blocks_peak, getattr(engine, "kv_blocks_peak", 0))
        texts = [[r.text for r in group] for group in results]
        scores = scorer.score(list(zip(messages, texts)))
        for p, msgs, group, got in zip(batch, messages, results, scores):
            summary.responses += len(group)
            summary.generated_tokens += sum(len(r.token_ids) for r in group)
            keep = [j for j, r in enumerate(group) if r.text.strip()]
            if not keep:
                summary.skipped_empty += 1
                continue
            best = max(keep, key=lambda j: got[j])
            row: dict[str, Any] = {
                "messages": [*msgs, {"role": "assistant", "content": group[best].text.strip()}],
                "id": p.id, "prompt_index": p.index, "reward": got[best], "run": out.run_key,
            }  # fmt: skip
            if cfg.keep_candidates:
                row["candidates"] = [
                    {"text": r.text, "reward": x, "finish_reason": r.finish_reason}
                    for r, x in zip(group, got)
                ]
            out.write(row)
            summary.prompts += 1
            best_sum += got[best]
            random_sum += got[rng.randrange(len(got))]
            all_sum += sum(got)
            n_all += len(got)
        summary.seconds = time.perf_counter() - start
        bar.update(len(batch))
        bar.set_postfix_str(
            f"{summary.prompts / summary.seconds:.2f} prompts/s, {summary.generated_tokens / summary.seconds:.0f} tok/s"
        )
    bar.close()
    summary.seconds = time.perf_counter() - start
    if summary.prompts:
        summary.mean_reward_best = best_sum / summary.prompts
        summary.mean_reward_random = random_sum / summary.prompts
        summary.mean_reward_all = all_sum / n_all
