"""The LLM engine: scheduler, KV cache, attention, sampler, detokenizer."""
