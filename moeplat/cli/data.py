"""`moeplat data prepare SPEC [--workers N] [-o DIR]`: tokenize a spec's sources once into
memory-mapped token shards (moeplat.data.prepare) that `data.source.kind: prepared` and
`data.prepared_dir` train from."""

from __future__ import annotations

from moeplat.errors import SpecError, SpecIssue


def cmd_prepare(args) -> int:
    from moeplat.compile.prepared import prepare_spec, resolve
    from moeplat.spec import load_spec

    loaded = load_spec(args.spec, args.overrides)
    d = loaded.spec.data
    if args.out:
        out, field = args.out, "-o"
    elif d.prepared_dir:
        out, field = resolve(d.prepared_dir, loaded.base_dir), "data.prepared_dir"
    else:
        raise SpecError(
            SpecIssue(
                "data.prepared_dir",
                "where should the shards go? pass -o DIR (or s3://bucket/prefix) or set data.prepared_dir",
                args.spec,
            )
        )
    if args.workers < 1:
        raise SpecError(SpecIssue("", f"--workers must be >= 1, got {args.workers}"))
    result, tok = prepare_spec(
        loaded.spec,
        loaded.base_dir,
        out,
        workers=args.workers,
        progress=not args.no_progress,
        shard_bytes=int(args.shard_mb * 2**20),
        field=field,
    )
    m = result.manifest
    tokens = {
        name: {split: sum(s["tokens"] for s in shards) for split, shards in e["shards"].items()}
        for name, e in m["sources"].items()
    }
    what = ", ".join(f"{n}: {t['train']:,} train + {t['val']:,} val tokens" for n, t in tokens.items())
    if result.action == "reused":
        print(f"{out}: already prepared ({result.reason}); {what}")
    else:
        rate = f", {result.tokens_per_s / 1e6:.2f}M tokens/s" if result.tokens_written else ""
        print(
            f"{out}: {result.action} ({result.reason}) with {args.workers} worker(s) in "
            f"{result.seconds:.1f} s{rate}; tokenizer {tok.kind} (vocab {tok.vocab_size}, {m['dtype']}); {what}"
        )
    return 0


def add_commands(sub, spec_args) -> None:
    p = sub.add_parser("data", help="prepare a spec's corpus as memory-mapped token shards (data prepare)")
    actions = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    t = actions.add_parser(
        "prepare",
        help="tokenize the spec's sources in parallel into token shards (resumable, fingerprinted)",
    )
    spec_args(t)
    t.add_argument("-o", "--out", metavar="DIR", help="directory or s3:// URL (default: data.prepared_dir)")
    t.add_argument("--workers", type=int, default=1, metavar="N", help="tokenizing processes (default 1)")
    t.add_argument(
        "--shard-mb", type=float, default=16.0, metavar="MB", help="text per shard, MiB (default 16)"
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(fn=cmd_prepare)
