#!/usr/bin/env bash
# One-command GPU check (issue 20, part 4): what a session lent a GPU machine runs, then reads back.
#
#   scripts/gpu-check.sh [OUT_DIR]            on a CUDA machine: under 5 minutes on one H100
#   scripts/gpu-check.sh --dry-run [OUT_DIR]  the same steps on the CPU at tiny sizes (tested in CI)
#
# The Python it uses: $MOEPLAT_PYTHON, else $MOEPLAT_VENV/bin/python, else this clone's .venv. That
# environment comes from the locked install (README, "Installing"): on a CUDA machine the CUDA build of
# torch first, then PYTHON=.venv/bin/python scripts/install-locked.sh --editable dev,gpu. Nothing here
# reaches the network: the corpus is the Python standard library, the tokenizer bytes, the
# transformers peers are built from configs.
#
# Steps (each logs to OUT_DIR/<step>.log; a failed step is recorded and the next one runs):
#   env       python, torch, CUDA, the device, and whether torch._grouped_mm is taken (bf16, fp32)
#   bench     moeplat bench on the device: MoE layer vs dense and transformers, float32 and bf16
#             (CUDA: the torch._grouped_mm path), and plan vs measured memory (max_memory_allocated)
#   dispatch  sorted dispatch (grouped GEMM) == the loop reference on the device, fwd+bwd, fp32 + bf16
#   eager     a 200-step quick-start run, bf16-mixed: perf/tokens_per_s and perf/mfu (MLflow, OUT_DIR/eager.db)
#   compile   the same with train.compile: true (OUT_DIR/compile.db); compile/eager tokens/s and losses
#   parallel  the expert-parallel and DDP equality tests. With one GPU they run as written, on CPU
#             processes over gloo: NCCL needs one GPU per rank and gloo has no CUDA all-to-all. The
#             CUDA-marked tests (tests/nn/test_nn_balance_scope.py) run on the GPU.
# Results: OUT_DIR/results.json (every figure) and OUT_DIR/summary.txt. Exit 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

dry=0 out=""
for arg in "$@"; do
  case $arg in
    --dry-run) dry=1 ;;
    -h | --help) sed -n '2,27p' "$0"; exit 0 ;;
    -*) echo "gpu-check: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) out=$arg ;;
  esac
done
out=${out:-gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out" && out=$(cd "$out" && pwd)
: >"$out/steps.tsv"

if [[ -n ${MOEPLAT_PYTHON:-} ]]; then
  py=$MOEPLAT_PYTHON from="MOEPLAT_PYTHON"
elif [[ -n ${MOEPLAT_VENV:-} ]]; then
  py=$MOEPLAT_VENV/bin/python from="MOEPLAT_VENV"
else
  py=$ROOT/.venv/bin/python from="this clone's .venv"
fi
if ! "$py" -c "import moeplat, torch" 2>/dev/null; then
  echo "gpu-check: $py ($from) cannot import moeplat and torch. Make the environment first (README, Installing):" >&2
  echo "  python -m venv .venv && .venv/bin/pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" >&2
  echo "  PYTHON=.venv/bin/python scripts/install-locked.sh --editable dev,gpu" >&2
  echo "or point MOEPLAT_VENV at an existing one." >&2
  exit 2
fi
echo "gpu-check: python $py ($from), torch $("$py" -c 'import torch; print(torch.__version__)'), output $out"

if ((dry)); then
  device=cpu accelerator=cpu precision=32-true spec=tests/fixtures/tiny.yaml steps=6 every=2
  bench=(--grid quick --tokens 64 --repeats 1 --warmup 0 --memory-spec tests/fixtures/tiny.yaml
    --e2e-spec tests/fixtures/tiny.yaml --e2e-rounds 1 --e2e-steps 1 --gen-tokens 16)
  tests=(tests/parallel/test_expert_parallel.py -m "not slow")
  # inductor takes about a minute on a 2-core CPU: the dry run checks the plumbing, not the compiler
  compile_env=(TORCH_COMPILE_DISABLE=1) compile_note="dry run: TORCH_COMPILE_DISABLE=1"
else
  if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu-check: torch $("$py" -c 'import torch; print(torch.__version__)') sees no CUDA device." >&2
    echo "  Install the CUDA build of torch (README, Installing), or run with --dry-run on a CPU." >&2
    exit 2
  fi
  device=cuda accelerator=gpu precision=bf16-mixed spec=specs/quickstart.yaml steps=200 every=10
  bench=(--repeats 5)
  tests=(tests/parallel/test_expert_parallel.py tests/parallel/test_ddp_equivalence.py
    tests/nn/test_nn_balance_scope.py -k "processes or cuda")
  compile_env=() compile_note=""
fi
note=""

# step NAME TIMEOUT_S COMMAND...: run it, log it, record "name status seconds" in steps.tsv
step() {
  local name=$1 limit=$2 t0 rc status
  shift 2
  echo "== $name"
  t0=$(date +%s)
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  status=ok
  ((rc == 124)) && status=timeout
  ((rc != 0 && rc != 124)) && status=failed
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(($(date +%s) - t0))" "exit $rc${note:+; $note}" >>"$out/steps.tsv"
  note=""
  tail -n 25 "$out/$name.log"
}

run=(-m moeplat.cli.main run "$spec" --no-progress --runs-dir "$out/runs"
  --set "train.max_steps=$steps" --set "train.val_every=$steps" --set "train.log_every=$every"
  --set "parallel.accelerator=$accelerator" --set "train.precision=$precision"
  --set tracking.system_metrics=false --set tracking.log_model=false)

step env 120 "$py" scripts/gpu_check.py env "$out" "$device"
step bench 180 "$py" -m moeplat.cli.main bench --no-step --no-data --json-out "$out/bench.json" "${bench[@]}"
step dispatch 60 "$py" scripts/gpu_check.py dispatch "$out" "$device"
step eager 120 "$py" "${run[@]}" --tracking-uri "sqlite:///$out/eager.db"
note=$compile_note
step compile 240 env "${compile_env[@]}" "$py" "${run[@]}" --tracking-uri "sqlite:///$out/compile.db" \
  --set train.compile=true
step runs 60 "$py" scripts/gpu_check.py runs "$out"
step parallel 300 "$py" -m pytest -q -p no:cacheprovider "${tests[@]}"
"$py" scripts/gpu_check.py summary "$out" >/dev/null
cat "$out/summary.txt"
! grep -qv $'\tok\t' "$out/steps.tsv"
