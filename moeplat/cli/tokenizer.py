"""`moeplat tokenizer train SPEC -o DIR`: train (or take from the cache) a spec's BPE tokenizer on
its own, on exactly the documents `moeplat run` trains it on, and write DIR/tokenizer.json."""

from __future__ import annotations

import time
from pathlib import Path

from moeplat.errors import SpecError, SpecIssue


def train_documents(loaded) -> list:
    """The training split of every source, as moeplat.compile.data.build_data splits it."""
    from moeplat.compile.data import split_sources

    return [doc for _, _, train, _ in split_sources(loaded.spec.data, loaded.base_dir) for doc in train]


def cmd_train(args) -> int:
    from moeplat.spec import load_spec

    loaded = load_spec(args.spec, args.overrides)
    tok_spec = loaded.spec.data.tokenizer
    if tok_spec.kind != "bpe":
        why = (
            "the byte tokenizer has nothing to learn"
            if tok_spec.kind == "byte"
            else f"an hf tokenizer is already trained (its file: {tok_spec.file})"
        )
        raise SpecError(
            SpecIssue("data.tokenizer.kind", f"{why}; `tokenizer train` trains kind: bpe", args.spec)
        )
    from moeplat.compile.tokenizer import build_tokenizer

    t0 = time.perf_counter()
    docs = train_documents(loaded)
    tok = build_tokenizer(tok_spec, docs, loaded.base_dir, show_progress=not args.no_progress)
    path = tok.save(Path(args.out))
    how = "taken from the cache" if tok.cached else f"trained on {len(docs)} documents"
    print(
        f"tokenizer {how} in {time.perf_counter() - t0:.1f} s: vocab {tok.vocab_size}, "
        f"EOS id {tok.eos_id} -> {path}"
    )
    return 0


def add_commands(sub, spec_args) -> None:
    p = sub.add_parser("tokenizer", help="train a spec's BPE tokenizer on its own (tokenizer train)")
    actions = p.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    t = actions.add_parser(
        "train",
        help="train (or take from the cache) the spec's bpe tokenizer; writes DIR/tokenizer.json",
    )
    spec_args(t)
    t.add_argument("-o", "--out", required=True, metavar="DIR", help="directory for tokenizer.json")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(fn=cmd_train)
