"""Serving: generation with a paged KV cache, continuous batching, and an OpenAI-compatible server.

    from llama3hp.inference import EngineConfig, LLMEngine, SamplingParams, load_serving_model
    model = load_serving_model("runs/tiny-<timestamp>")       # any layout, HF or Meta folder too
    engine = LLMEngine(model, EngineConfig(kv_memory_gib=1.0))
    [[sample]] = engine.generate([prompt_ids], SamplingParams(max_tokens=64), tokenizer)  # .text

The model's forward is never rewritten: `attention.apply_kv_cache` swaps each block's attention
for a cache-aware one, and the head returns the logits of the sampled rows only. The modules,
in the order a step runs through them: kv_cache, scheduler, runner (CUDA graphs), attention,
sampling, engine; detokenize and server on the consumer's side; loading, tp and build to set up.
"""

from llama3hp.inference.engine import EngineConfig, GenerationResult, LLMEngine, TokenOutput
from llama3hp.inference.loading import load_serving_model
from llama3hp.inference.sampling import SamplingParams

__all__ = [
    "EngineConfig",
    "GenerationResult",
    "LLMEngine",
    "SamplingParams",
    "TokenOutput",
    "load_serving_model",
]
