"""Benchmarks that print ratios against a baseline measured in the same process (`moeplat bench`).

layer.py: an MoE layer's forward+backward per dispatcher vs its dense equivalent and its
transformers peer; step.py: whole-step overhead of the Lightning + tracking loop vs a plain loop,
and `moeplat validate`'s wall time; memory.py: `moeplat plan`'s memory estimate vs the measured
peak of a training step; report.py: the tables.
"""
