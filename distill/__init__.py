"""Stage 2: students from soft targets. Distillation losses and the criterion, teacher sources
(the interface, and a teacher run online), the training step and loop, run folders and resume."""
