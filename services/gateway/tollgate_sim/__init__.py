"""A vLLM-compatible upstream simulator for the demo, the tests and the benchmarks."""
