"""Evaluation: lm-eval-compatible zero-shot tasks, perplexity, KV cache, throughput, reports."""
