"""Tiny local lm-evaluation-harness tasks for tests: custom YAML tasks over jsonl files written into a
directory (no download; the datasets cache lies beside them, not in ~/.cache)."""

from __future__ import annotations

import json
from pathlib import Path

# 8 documents; the right answer is the first choice, so a model that scores them all alike is
# right exactly when it prefers the first of equal scores
MC_DOCS = [
    {"q": f"{a} plus {b} is", "choices": [str(a + b), str(a + b + 1), str(a * b + 3)], "label": 0}
    for a, b in [(1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 7), (7, 8), (8, 9)]
]
# one text longer than the tiny model's 32-token window, so rolling windows are exercised
PPL_DOCS = [
    {"text": "def add(a, b):\n    return a + b\n\nprint(add(1, 2)) # three, as expected by all"},
    {"text": "import os\nos.path.join('a', 'b')"},
]
GEN_DOCS = [{"prompt": "x = ", "answer": "1"}, {"prompt": "def f", "answer": "(x):"}]

MC = "tiny_mc"
PPL = "tiny_ppl"
GEN = "tiny_gen"


def _jsonl(path: Path, docs: list[dict]) -> None:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))


def _header(task: str, data: Path, cache: Path, output_type: str) -> str:
    return (
        f"task: {task}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {cache}\n"
        "test_split: test\n"
        f"output_type: {output_type}\n"
    )


def write_tasks(root: Path) -> Path:
    """Write the three tasks (multiple_choice, loglikelihood_rolling, generate_until) into
    `root`/tasks and return that directory (an lm_eval include path)."""
    tasks = Path(root) / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    cache = Path(root) / "hf-datasets-cache"
    for name, docs in ((MC, MC_DOCS), (PPL, PPL_DOCS), (GEN, GEN_DOCS)):
        _jsonl(tasks / f"{name}.jsonl", docs)
    (tasks / f"{MC}.yaml").write_text(
        _header(MC, tasks / f"{MC}.jsonl", cache, "multiple_choice")
        + 'doc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        + "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (tasks / f"{PPL}.yaml").write_text(
        _header(PPL, tasks / f"{PPL}.jsonl", cache, "loglikelihood_rolling")
        + 'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        + "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    (tasks / f"{GEN}.yaml").write_text(
        _header(GEN, tasks / f"{GEN}.jsonl", cache, "generate_until")
        + 'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        + 'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8\n'
        + "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return tasks
