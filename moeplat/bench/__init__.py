"""Benchmarks that print ratios against a baseline measured in the same process (`moeplat bench`).

layer.py: an MoE layer's forward+backward per dispatcher vs its dense equivalent and its
transformers peer; e2e.py (+ e2e_phases.py): the whole training step of the MoE model vs its
dense counterpart vs the transformers model of the same function, and where its time goes;
step.py: whole-step overhead of the Lightning + tracking loop vs a plain loop,
and `moeplat validate`'s wall time; memory.py: `moeplat plan`'s memory estimate vs the measured
peak of a training step; report.py: the tables.
"""
