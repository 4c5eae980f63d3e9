"""Parallel training: expert parallelism (groups, all-to-all, the expert-parallel MoE layer,
gradient reduction, resharding checkpoints), strategies and launchers.

Kept free of imports so `import moeplat.parallel` stays cheap; import the submodules you need:
``moeplat.parallel.groups``, ``.all_to_all``, ``.expert_parallel``, ``.grads``, ``.checkpoint``.
"""
