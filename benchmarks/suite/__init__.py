"""The benchmarks run_all runs: each prints a table and writes benchmarks/results/<name>.json."""
