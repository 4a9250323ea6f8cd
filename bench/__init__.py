"""airgate's side-by-side benchmark: `make bench` (full) or `make bench-quick`.

Everything here is harness code: it starts the stand-in vLLM, the contenders (direct, airgate,
the seed's Nginx, a tuned Nginx, LiteLLM's proxy) and the load generators, measures, and writes
bench/results/LATEST.md with charts. Nothing in proxy/ imports it.
"""
