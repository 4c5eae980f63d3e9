"""`moeplat bench`: MoE layer speed and memory vs its dense equivalent and transformers, the
whole training step end to end (MoE vs dense vs transformers, and its phases), the training
loop's overhead vs a plain loop, `moeplat validate`'s wall time, and `moeplat plan`'s memory
estimate vs the measured peak of a training step."""

from __future__ import annotations

import json
import sys

REFERENCE_SPEC = "specs/quickstart.yaml"
# plan vs measured memory: the quick-start and every reference mini (globs, from the repo root)
MEMORY_SPECS = ("specs/quickstart.yaml", "specs/reference/*-mini.yaml")
GENERATE_PROMPTS = (32, 256)  # prompt tokens of the generation figures (+ --gen-tokens <= 512)


def add_commands(sub) -> None:
    p = sub.add_parser(
        "bench", help="time MoE layers (ratios vs dense and transformers), step overhead, validate"
    )
    p.add_argument(
        "--grid", choices=["default", "quick"], default="default", help="grid points (quick: tiny)"
    )
    p.add_argument("--tokens", type=int, help="tokens per forward (default: the grid's, 4096)")
    p.add_argument("--repeats", type=int, default=5, help="measured rounds (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured rounds first")
    p.add_argument("--spec", metavar="FILE", help="bench this spec's first MoE layer instead of the grid")
    p.add_argument("--step-spec", default=REFERENCE_SPEC, help="spec for step overhead and validate time")
    p.add_argument(
        "--steps", type=int, default=60, help="measured optimizer steps per loop and round (3 rounds)"
    )
    p.add_argument("--no-step", action="store_true", help="skip the step-overhead and validate figures")
    p.add_argument(
        "--memory-spec",
        action="append",
        metavar="FILE",
        help="plan vs measured memory for this spec (repeatable; default: the quick-start and the "
        "reference minis)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip plan vs measured memory")
    p.add_argument("--no-layers", action="store_true", help="skip the MoE layer table")
    p.add_argument(
        "--no-data",
        action="store_true",
        help="skip the data section (prepare throughput, loading wait, RSS on a 1 GiB-token corpus)",
    )
    p.add_argument(
        "--data-tokens",
        type=float,
        default=1.0,
        metavar="GiB",
        help="training tokens of the big prepared corpus of the RSS figure, GiB (default 1; 0: skip it)",
    )
    p.add_argument(
        "--no-generate",
        action="store_true",
        help="skip generation speed (KV cache vs recomputing the prefix vs transformers generate)",
    )
    p.add_argument(
        "--gen-tokens",
        type=int,
        default=256,
        metavar="N",
        help="new tokens per generation figure (default 256)",
    )
    p.add_argument(
        "--no-e2e",
        action="store_true",
        help="skip the end-to-end step (moeplat MoE vs dense vs transformers, and its phases)",
    )
    p.add_argument(
        "--e2e-spec", default=REFERENCE_SPEC, metavar="FILE", help="model of the end-to-end section"
    )
    p.add_argument(
        "--e2e-dense-spec",
        metavar="FILE",
        help="its dense counterpart (default: quickstart-dense.yaml for the quick-start, else derived: "
        "each MoE layer -> one FFN of hidden top_k * d_ff)",
    )
    p.add_argument("--e2e-rounds", type=int, default=5, metavar="N", help="interleaved rounds (median)")
    p.add_argument("--e2e-steps", type=int, default=3, metavar="N", help="steps per candidate and round")
    p.add_argument(
        "--e2e-compile",
        action="store_true",
        help="add torch.compile of the moeplat MoE step (compiling takes minutes on 2 CPU cores)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--json-out", metavar="FILE", help="also write the JSON to FILE (the tables still print)")
    p.set_defaults(fn=cmd_bench)


def _spec_point(args):
    """(grid point, built MoE layer) of a spec's first MoE layer; tokens = batch_size * seq_len."""
    from dataclasses import replace

    from moeplat.bench.layer import Point
    from moeplat.compile.model import build_moe_layer
    from moeplat.errors import SpecError, SpecIssue
    from moeplat.spec import load_spec

    spec = load_spec(args.spec).spec
    m = spec.model
    if m.moe is None:
        raise SpecError(SpecIssue("model.moe", "--spec: the model is dense, there is no MoE layer to bench"))
    layer = build_moe_layer(m.moe, m.d_model, m.vocab_size, 0, spec.train.compile)
    shared = layer.shared.w_up.out_features if layer.shared is not None else 0
    p = Point(m.d_model, layer.experts.d_ff, layer.num_experts, layer.top_k, shared)
    return replace(p, tokens=args.tokens or spec.train.batch_size * spec.data.seq_len), layer


def cmd_bench(args) -> int:
    from dataclasses import replace

    import torch

    from moeplat.bench.layer import GRIDS, bench_point
    from moeplat.bench.report import format_overhead, format_rows

    for flag, value in (
        ("--gen-tokens", args.gen_tokens),
        ("--e2e-rounds", args.e2e_rounds),
        ("--e2e-steps", args.e2e_steps),
    ):
        if value < 1:
            print(f"error: {flag} must be >= 1, got {value}", file=sys.stderr)
            return 2
    from moeplat.train.host_memory import keep_heap_memory

    heap_kept = keep_heap_memory()  # as a training process runs (moeplat.train.run)
    if not args.json:
        how = "kept in the heap (mallopt)" if heap_kept else "the C library's defaults"
        print(f"host allocator: {how}, as in training; MOEPLAT_MALLOPT=0 turns it off", flush=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    if args.no_layers:
        points = []
    elif args.spec:
        points = [_spec_point(args)]
    else:
        points = [(replace(p, tokens=args.tokens) if args.tokens else p, None) for p in GRIDS[args.grid]]
    rows = []
    for p, layer in points:
        for dtype in dtypes:
            kw = {"warmup": args.warmup, "repeats": args.repeats, "spec_layer": layer}
            rows += bench_point(p, dtype, device, **kw)
            if not args.json:
                print(
                    format_rows([r for r in rows if r.point == p.label and r.dtype == str(dtype)[6:]]),
                    flush=True,
                )
    result = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads()}
    result["heap_kept"] = heap_kept
    result["layers"] = [r.to_dict() for r in rows]
    if not args.no_e2e:
        result["e2e"] = _e2e(args, device)
    if not args.no_step:
        from moeplat.bench.step import step_overhead, validate_wall_s

        result["step"] = step_overhead(args.step_spec, steps=args.steps)
        result["validate_s"] = validate_wall_s(args.step_spec)
        if not args.json:
            print(format_overhead(result["step"]))
            print(f"\nmoeplat validate {args.step_spec}: {result['validate_s']:.2f} s wall (target < 0.5 s)")
    if not args.no_memory:
        result["memory"] = _memory(args, device)
    if not args.no_data:
        from moeplat.bench.data import data_bench, format_data

        big = int(args.data_tokens * 2**30)
        result["data"] = data_bench(args.step_spec, rss=big > 0, big_tokens=big)
        if not args.json:
            print(format_data(result["data"]), flush=True)
    if not args.no_generate:
        from moeplat.bench.generate import format_generation, generation_bench

        result["generate"] = []
        for prompt in GENERATE_PROMPTS:  # the cache's gain grows with the prefix it saves recomputing
            g = generation_bench(REFERENCE_SPEC, args.gen_tokens, prompt_tokens=prompt, device=str(device))
            result["generate"].append(g)
            if not args.json:
                print(format_generation(g), flush=True)
    if args.json:
        print(json.dumps(result, indent=2, default=float))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2, default=float)
    return 0


def _e2e(args, device) -> dict:
    """The whole training step of the MoE model vs its dense counterpart and transformers."""
    from moeplat.bench.e2e import e2e_bench, format_e2e

    kw = {"rounds": args.e2e_rounds, "steps": args.e2e_steps, "compiled": args.e2e_compile}
    result = e2e_bench(args.e2e_spec, args.e2e_dense_spec, device=str(device), **kw)
    if not args.json:
        print(format_e2e(result), flush=True)
    return result


def _memory(args, device) -> list[dict]:
    """Plan's memory estimate vs the measured peak of one training step, per spec."""
    import glob

    from moeplat.bench.memory import compare
    from moeplat.bench.report import format_memory

    files = args.memory_spec or [f for pattern in MEMORY_SPECS for f in sorted(glob.glob(pattern))]
    rows = [compare(f, device) for f in files]
    if not args.json:
        print(format_memory(rows), flush=True)
    return [r.to_dict() for r in rows]
