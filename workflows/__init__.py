"""What drives both stages: the demo, sweeps of students over one cache, and plots of runs.
Above cache_teacher and distill, below the CLI; nothing below imports it."""
