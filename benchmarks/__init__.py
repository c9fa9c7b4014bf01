"""Kernel microbenchmarks: `python -m benchmarks.bench_<op> [--quick]`, or all of them with `python -m benchmarks.run_all`."""
