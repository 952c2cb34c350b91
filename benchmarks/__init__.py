"""Benchmarks and studies, run from the repository root as `python -m benchmarks.<group>.<name>`:
harness/ (what they share), suite/ (what run_all runs), studies/ (one-off studies)."""
