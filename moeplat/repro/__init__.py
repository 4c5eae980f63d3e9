"""`moeplat repro`: the field's findings about MoE, reproduced at quick-start scale on real text
with several seeds, written as a results table (docs/results.md) whose every number names its run."""
