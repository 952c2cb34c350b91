"""What the benchmarks share: options, teachers and data, result files, timing workers, queues."""
