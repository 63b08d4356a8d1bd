#!/usr/bin/env bash
# Side by side on one GPU: ./qlora and the Hugging Face QLoRA anchor (transformers + peft +
# bitsandbytes, ../shared/bench/hf_qlora.py) on the same shapes, plus the measured bf16 GEMM peak.
#   dev/bench/compare.sh [ANCHOR_DIR]      (default ../shared/bench; needs bitsandbytes importable)
#   LONG=1 dev/bench/compare.sh ...      also one llama3-8b sequence of 131,072 tokens (recompute on)
#   CONFIGS="llama3-8b 1,llama3-1b 0"     which "shape recompute" rows (default: the four of the table; "" none)
# Prints one table: tok/s, MFU against the measured peak, peak GPU memory, ratio to each anchor.
set -uo pipefail
A=${1:-../shared/bench}
peak=$(python3 "$A/gemm_peak.py" | python3 -c "import json,sys; d=json.load(sys.stdin); print(d['gemm_8192x8192x8192_tflops'])")
echo "bf16 GEMM peak (8192^3): $peak TFLOP/s"
rows=()
IFS=, read -ra cfgs <<< "${CONFIGS-llama3-1b 0,llama3-1b 1,llama3-8b 1,llama3-8b 0}"
for cfg in "${cfgs[@]}"; do
  set -- $cfg; shape=$1; rc=$2
  q=$(./qlora --model random:$shape --batch 4 --seq 2048 --steps 8 --peak-tflops "$peak" $([ "$rc" = 1 ] && echo --recompute) 2>&1 | tail -n1)
  ours=$(echo "$q" | sed -n 's/.*| \([0-9]*\) tok\/s | MFU \([0-9.]*\)%.*(driver) \([0-9.]*\) GiB.*/\1 \2 \3/p')
  hf=()
  for up in 1 0; do
    r=$(python3 "$A/hf_qlora.py" --shape ${shape/llama3-/llama-} --batch 4 --seq 2048 --ckpt $rc --upcast $up --steps 6 --warmup 2 2>/dev/null | tail -n1)
    hf+=("$(echo "$r" | python3 -c "import json,sys
try: d=json.loads(sys.stdin.read()); print(d['tok_s'], d['peak_gib'])
except Exception: print('OOM -')")")
  done
  rows+=("$shape|$rc|$ours|${hf[0]}|${hf[1]}")
  echo "$shape recompute $rc: qlora (tok/s MFU GiB) $ours | HF upcast (tok/s GiB) ${hf[0]} | HF bf16 ${hf[1]}"
done
# LONG=1: one llama3-8b sequence of 131,072 tokens with recompute (one step: ~2 minutes); the anchor
# runs out of memory long before that length (bf16 kept, recompute on, the cheapest recipe it has)
if [ "${LONG:-0}" = 1 ]; then
  q=$(./qlora --model random:llama3-8b --batch 1 --seq 131072 --steps 1 --recompute --peak-tflops "$peak" 2>&1 | tail -n1)
  ours=$(echo "$q" | sed -n 's/.*| \([0-9]*\) tok\/s | MFU \([0-9.]*\)%.*(driver) \([0-9.]*\) GiB.*/\1 \2 \3/p')
  r=$(python3 "$A/hf_qlora.py" --shape llama-8b --batch 1 --seq 131072 --ckpt 1 --upcast 0 --steps 2 --warmup 1 2>/dev/null | tail -n1)
  h0=$(echo "$r" | python3 -c "import json,sys
try: d=json.loads(sys.stdin.read()); print(d['tok_s'], d['peak_gib'])
except Exception: print('OOM -')")
  rows+=("llama3-8b-131k|1|$ours|- -|$h0")
fi
printf "\n%-10s %-9s | %-28s | %-20s | %-20s | %s\n" model recompute "qlora tok/s (MFU, GiB)" "HF upcast tok/s,GiB" "HF bf16 tok/s,GiB" "speedup vs HF (upcast / bf16)"
for r in "${rows[@]}"; do
  IFS='|' read -r shape rc ours h1 h0 <<< "$r"; read -r t m g <<< "$ours"; read -r t1 g1 <<< "$h1"; read -r t0 g0 <<< "$h0"
  s1=$(python3 -c "print(f'{$t/$t1:.2f}x' if '$t1' not in ('OOM','','-') else '-')" 2>/dev/null); s0=$(python3 -c "print(f'{$t/$t0:.2f}x' if '$t0' not in ('OOM','','-') else '-')" 2>/dev/null)
  printf "%-10s %-9s | %8s (%5s%%, %6s GiB) | %9s, %6s | %9s, %6s | %s / %s\n" "$shape" "$([ $rc = 1 ] && echo on || echo off)" "$t" "$m" "$g" "$t1" "$g1" "$t0" "$g0" "$s1" "$s0"
done
