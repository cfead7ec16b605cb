#!/usr/bin/env bash
# GPU speed check (issue #15, part 3), in one script with a total budget (default 300 s):
#   1. engine_vs_hf at the SmolLM2-135M and the Qwen3-1.7B shapes (8 x 256 tokens, bf16): aimm's
#      engine compiled and eager against plain HF + PEFT compiled and eager; the goal is aimm
#      compiled within 1.2x of plain compiled HF + PEFT (the issue's H200 reference: 33 and 44 ms
#      per step), compiled against eager from the same runs;
#   2. then, as the budget allows: evaluation throughput, and AIMMerging's training overhead
#      (T5-large and Qwen3-1.7B shapes, eager and torch.compile).
#
#   bash benchmarks/gpu_check.sh               # on a CUDA machine (writes ${OUT:-runs/gpu_check})
#   bash benchmarks/gpu_check.sh --cpu-smoke   # the same logic on CPU with tiny models, ~2 min
#
# Needs: torch with CUDA, transformers, peft, accelerate, pandas, pyyaml (no rouge-score / gguf /
# nltk / plotly, no internet). The package is used from the working tree (PYTHONPATH=$PWD); the
# SmolLM2 tokenizer must be at $AIMM_CACHE/smollm2-135m-tokenizer (default: ./.cache/aimm when
# that folder holds it, else ~/.cache/aimm; e.g. `mkdir -p .cache/aimm && cp -r
# ~/.cache/aimm/smollm2-135m-tokenizer .cache/aimm/` and carry `.cache/aimm` to the GPU machine).
# Models are random-init shapes (random:smollm2-135m, random:qwen3-1.7b, random:t5-large; built
# on the GPU), bf16 weights, synthetic batches (the vocabulary is SmolLM2's 49,152 for all).
#
# Every sub-benchmark runs under `timeout`, sized from what is left of BUDGET_S; a failure or a
# timeout is recorded and the script goes on. Each benchmark rewrites its JSON after every run,
# so a timed-out one still leaves its finished runs ("partial": true). Exit status: 0 when the
# pre-flight passed (see summary.json for each sub-benchmark's status), 2 otherwise.
# Knobs (environment): OUT, BUDGET_S (300; 600 runs every part on an H200, estimated), P_SMOL /
# P_QWEN_HF / P_EVAL / P_QWEN / P_T5 (planned seconds per sub-benchmark, in this order: 100 / 130 /
# 35 / 160 / the rest; 0 skips one), PYTHON, AIMM_CACHE; SMOKE_MODES=eager,compile adds
# torch.compile to --cpu-smoke's train_overhead and SMOKE_BACKEND=inductor to its engine_vs_hf
# (default eager: trace only; inductor takes several minutes on a CPU).
set -u

MODE=gpu
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) MODE=cpu ;;
    -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUDGET_S=${BUDGET_S:-300}
START=$(date +%s)

if [ -z "${PYTHON:-}" ]; then
  if [ "$MODE" = cpu ] && [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
if [ -z "${AIMM_CACHE:-}" ]; then
  if [ -d "$ROOT/.cache/aimm/smollm2-135m-tokenizer" ]; then AIMM_CACHE=$ROOT/.cache/aimm; else AIMM_CACHE=$HOME/.cache/aimm; fi
fi
export AIMM_CACHE PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::FutureWarning}

STATUS_FILE=$OUT/status.tsv
: > "$STATUS_FILE"
log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" >&2; }
left() { echo $(( BUDGET_S - ($(date +%s) - START) )); }

# run_bench NAME PLANNED_S CMD...: run under timeout min(PLANNED_S, what is left - 5 s reserve)
run_bench() {
  local name=$1 planned=$2; shift 2
  local remain=$(( $(left) - 5 ))
  local limit=$(( planned < remain ? planned : remain ))
  if [ "$planned" -le 0 ]; then
    log "$name: skipped (planned 0 s)"
    printf '%s\tskipped\t0\t0\n' "$name" >> "$STATUS_FILE"
    return
  fi
  if [ "$limit" -lt 10 ]; then
    log "$name: skipped (budget spent)"
    printf '%s\tskipped\t0\t0\n' "$name" >> "$STATUS_FILE"
    return
  fi
  log "$name: start (timeout ${limit}s)"
  local t0=$(date +%s)
  timeout --signal=TERM --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  local status=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=timeout; elif [ "$rc" -ne 0 ]; then status=failed; fi
  log "$name: $status (rc $rc, ${dt}s)"
  [ "$status" = ok ] || tail -n 5 "$OUT/$name.log" | sed "s/^/    /" >&2
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$dt" >> "$STATUS_FILE"
}

# ---------------------------------------------------------------------------- pre-flight
log "mode $MODE, python $PYTHON, AIMM_CACHE $AIMM_CACHE, out $OUT, budget ${BUDGET_S}s"
timeout 60 "$PYTHON" - "$MODE" "$OUT/preflight.json" <<'EOF'
import json, os, sys
mode, out = sys.argv[1], sys.argv[2]
import torch
info = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
tok = os.path.join(os.environ["AIMM_CACHE"], "smollm2-135m-tokenizer")
info["tokenizer"] = tok if os.path.isdir(tok) else None
import aimm.engine, aimm.evaluation, aimm.models, aimm.data.synthetic  # noqa: E401,F401
info["optional_modules_imported_by_aimm"] = sorted(
    m for m in ("rouge_score", "nltk", "gguf", "plotly") if m in sys.modules)
problems = []
if mode == "gpu" and not info["cuda"]:
    problems.append("torch sees no CUDA device")
if info["tokenizer"] is None:
    problems.append(f"tokenizer folder missing: {tok} (carry it, or set AIMM_CACHE)")
info["problems"] = problems
json.dump(info, open(out, "w"), indent=1)
print(json.dumps(info))
sys.exit(1 if problems else 0)
EOF
if [ $? -ne 0 ]; then
  log "pre-flight failed (see $OUT/preflight.json)"
  exit 2
fi

# ---------------------------------------------------------------------------- sizes
DATA=$(mktemp -d "${TMPDIR:-/tmp}/aimm-gpu-check-XXXXXX")
trap 'rm -rf "$DATA"' EXIT
if [ "$MODE" = gpu ]; then
  DEV=cuda; T5=random:t5-large; QWEN=random:qwen3-1.7b
  # 16 inner steps on task 2 (128 examples / batch 8), 4 on task 1 (32 examples: the memory
  # buffer fills a memory batch of 32), ~256-token prompts, bf16 weights, fused AdamW
  SIZE=(--dtype bfloat16 --batch-size 8 --max-train 128 --task1-steps 2 --max-input-len 256
        --prompt-tokens 256 --memory-batch-size 32 --initial-interval 4 --max-test 2)
  # one process per model: eager (seq_lora, release, fast; 1 repeat: GPU timings are steady),
  # then torch.compile (seq_lora, fast; repeat 0 compiles and is discarded, repeat 1 is
  # measured; "steady" leaves out 4 steps). Under compile the engine pads batch widths to
  # multiples of 64 (one graph per bucket) and evaluates eagerly, so the warm-up is the
  # training graph plus the probe graph. Qwen3 (the issue's compiled reference) goes first;
  # T5 gets whatever budget is left, and its JSON keeps the eager numbers if compile times out.
  MODES=(--modes eager,compile --repeats 1 --compile-settings fast --compile-repeats 2
         --discard-first compile --warmup-steps 4)
  EVAL_N=64; EVAL_WORDS=236
  SMOL=random:smollm2-135m
  # engine_vs_hf: the compiled pair first (the goal), then eager; 2 interleaved repeats, the
  # first 5 steps (compilation) left out of the timing
  EVH=(--device cuda --dtype bfloat16 --batch-size 8 --seq-len 256 --steps 16 --warmup-steps 5
       --repeats 2 --gemm-seconds 0.1 --compile-backend inductor)
  P_SMOL=${P_SMOL:-100}; P_QWEN_HF=${P_QWEN_HF:-130}
  P_EVAL=${P_EVAL:-35}; P_QWEN=${P_QWEN:-160}; P_T5=${P_T5:-300}
else
  DEV=cpu; T5=tiny-seq2seq; QWEN=tiny-causal
  SIZE=(--dtype bfloat16 --batch-size 3 --max-train 6 --task1-steps 1 --max-input-len 64
        --prompt-tokens 32 --memory-batch-size 2 --initial-interval 2 --max-test 1)
  # compiling takes minutes on a CPU: eager only, with the warm-up-repeat logic exercised
  MODES=(--modes "${SMOKE_MODES:-eager}" --repeats 2 --compile-settings fast --compile-repeats 2
         --discard-first compile --warmup-steps 1)
  EVAL_N=4; EVAL_WORDS=20
  SMOL=tiny-causal
  EVH=(--device cpu --dtype bfloat16 --batch-size 2 --seq-len 32 --steps 4 --warmup-steps 1
       --repeats 1 --gemm-seconds 0.02 --compile-backend "${SMOKE_BACKEND:-eager}")
  P_SMOL=${P_SMOL:-60}; P_QWEN_HF=${P_QWEN_HF:-60}
  P_EVAL=${P_EVAL:-40}; P_QWEN=${P_QWEN:-90}; P_T5=${P_T5:-90}
fi
COMMON=(--device "$DEV" --fused-optimizer --settings release,fast "${SIZE[@]}" "${MODES[@]}")
EVH+=(--trainers aimm_compiled,plain_compiled,aimm,plain)

"$PYTHON" -c "
from aimm.data.synthetic import make_synthetic_benchmark
make_synthetic_benchmark('$DATA', n_train=2, n_test=$EVAL_N, words=($EVAL_WORDS, $EVAL_WORDS + 4))
" || log "could not write synthetic eval data"

# ---------------------------------------------------------------------------- benchmarks
run_bench engine_vs_hf_smollm2 "$P_SMOL" "$PYTHON" -m benchmarks.engine_vs_hf \
  --model "$SMOL" "${EVH[@]}" --out "$OUT/engine_vs_hf_smollm2.json"
run_bench engine_vs_hf_qwen3 "$P_QWEN_HF" "$PYTHON" -m benchmarks.engine_vs_hf \
  --model "$QWEN" "${EVH[@]}" --out "$OUT/engine_vs_hf_qwen3.json"
run_bench eval_throughput_qwen3 "$P_EVAL" "$PYTHON" -m benchmarks.eval_throughput \
  --model "$QWEN" --device "$DEV" --data-dir "$DATA/data_longsequence" --task agnews \
  --split test --n "$EVAL_N" --batch-size 16 --max-input-len 256 --repeats 2 \
  --out "$OUT/eval_throughput_qwen3.json"
run_bench train_overhead_qwen3 "$P_QWEN" "$PYTHON" -m benchmarks.train_overhead \
  --model "$QWEN" "${COMMON[@]}" --out "$OUT/train_overhead_qwen3.json"
run_bench train_overhead_t5 "$P_T5" "$PYTHON" -m benchmarks.train_overhead \
  --model "$T5" "${COMMON[@]}" --out "$OUT/train_overhead_t5.json"

# ---------------------------------------------------------------------------- summary
"$PYTHON" - "$OUT" "$(( $(date +%s) - START ))" <<'EOF'
import json, sys
from pathlib import Path
out, total = Path(sys.argv[1]), int(sys.argv[2])
rows = [line.split("\t") for line in (out / "status.tsv").read_text().splitlines() if line]
summary = {"total_s": total, "benchmarks": {}}
# issue #15, part 3: plain compiled HF + PEFT on the H200, 8 x 256 tokens per step
REFERENCE_MS = {"random:smollm2-135m": 33, "random:qwen3-1.7b": 44}
def f(x, spec="6.3f"):
    return format(x, spec) if isinstance(x, (int, float)) else "-"
print(f"\n{'benchmark':<30}{'status':>8}{'s':>5}  details")
for name, status, rc, dt in rows:
    path = out / f"{name}.json"
    data = json.loads(path.read_text()) if path.is_file() else None
    entry = {"status": status, "rc": int(rc), "seconds": int(dt), "json": path.name if data else None}
    if data is not None and data.get("partial"):
        entry["partial"] = True
    summary["benchmarks"][name] = entry
    print(f"{name:<30}{status:>8}{dt:>5}  " + ("(partial JSON)" if entry.get("partial") else "")
          + ("(no JSON)" if data is None else ""))
    if data and name.startswith("train_overhead") and data.get("summary"):
        s, r = data["summary"], data.get("ratios", {})
        for v, sv in s.items():
            rv = r.get(v, {})
            peak = sv.get("peak_memory_bytes")
            print(f"    {v:<25} train {f(sv['train_s'], '7.2f')}s  opt {f(sv['optimizer_steps'], '3.0f')}"
                  f"  s/opt {f(sv['s_per_optimizer_step'], '7.4f')}  x/opt {f(rv.get('time_per_optimizer_step'), '5.2f')}"
                  f"  xtrain {f(rv.get('stage2_train_time'), '5.2f')}"
                  f"  steady x/opt {f(rv.get('steady_time_per_optimizer_step'), '5.2f')}"
                  f"  peak {f(peak / 2**30 if peak else None, '6.2f')} GiB")
            entry.setdefault("ratios", {})[v] = rv
    if data and name.startswith("engine_vs_hf"):
        ref = REFERENCE_MS.get(data.get("model"))
        for t, sv in data.get("summary", {}).items():
            ms = sv["s_per_step"] * 1e3 if isinstance(sv.get("s_per_step"), (int, float)) else None
            vs = f"  {ms / ref:5.2f}x the issue's {ref} ms (H200)" if ms and ref and t.endswith("compiled") else ""
            print(f"    {t:<16} {f(ms, '8.1f')} ms/step{vs}")
            entry.setdefault("ms_per_step", {})[t] = ms
        for k, rv in data.get("ratios", {}).items():
            print(f"    {k:<30} {f(rv.get('time_per_step'), '6.3f')}x"
                  + (f"  goal <= {rv['goal']}: {rv['verdict']}" if "goal" in rv else ""))
            entry.setdefault("ratios", {})[k] = {x: rv.get(x) for x in
                                                 ("time_per_step", "per_repeat", "goal", "verdict")}
        if ref:
            entry["reference_ms"] = ref
    if data and name.startswith("eval_throughput"):
        keys = [k for k in data if k.startswith("speedup")]
        b = data.get("batched", {})
        print(f"    batched {f(b.get('examples_per_s'), '8.1f')} ex/s  "
              + "  ".join(f"{k} {f(data[k], '6.2f')}" for k in keys))
        entry["batched_examples_per_s"] = b.get("examples_per_s")
        entry.update({k: data[k] for k in keys})
print(f"total {total}s")
(out / "summary.json").write_text(json.dumps(summary, indent=1))
EOF
exit 0
