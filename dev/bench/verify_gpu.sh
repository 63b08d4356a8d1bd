#!/usr/bin/env bash
# dev/bench/verify_gpu.sh: one device call's worth of checks and measurements, built on this machine
# (nvcc, no GPU) and run on the GPU machine, so that a call spends its minutes running, not compiling.
#   dev/bench/verify_gpu.sh build [BASE]   here: stripped sm_90a binaries into build/verify (~35 MB): the
#                                          trainer, its GPU tests, the playgrounds, and BASE's trainer
#                                          (a commit, built whole in a worktree) for the A/B
#   dev/bench/verify_gpu.sh run            there, with build/verify carried: results under $OUT
# run, in this order, each stage skipped once LIMIT seconds (default 540) have passed:
#   1. test_qlora, test_attention, test_kernels, test/test_resilience.sh (pass/fail lines);
#   2. the playgrounds in PG (built: those below, lora_backward and pcie_copy; default: attention_forward 2a,5a,5b,1l,5a64,5c64; attention_backward 4a,6a,6f,4a64,6c64,6f64,6h64;
#      rmsnorm; "attention_forward:" with nothing after the colon runs all its variants);
#   3. the A/B: llama3-8b 4 x 2048 without and with --recompute (llama3-1b 4 x 2048 after 4.), this tree's trainer
#      and BASE's on the same machine: losses (9 digits) must agree bit for bit where the change says so;
#   4. one llama3-8b 1 x 131,072 step (LONG=0 skips it).
# $OUT gets summary.txt (every pass/fail line, every step line and median) and one log a stage.
set -uo pipefail
V=build/verify
case "${1:-}" in
build)
  base=${2:-}
  mkdir -p $V
  F="-std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a"
  make -s -B qlora build/test_qlora build/test_attention build/test_kernels GPU_ARCH=90 NVCCFLAGS="$F" || exit 1   # no -lineinfo: half the size
  cp qlora build/test_qlora build/test_attention build/test_kernels $V/
  for f in attention_forward attention_backward rmsnorm lora_backward pcie_copy; do
    nvcc $F -o $V/$f dev/cuda/$f.cu -lcublas -lcublasLt || exit 1
  done
  if [ -n "$base" ]; then
    w=$(mktemp -d); git worktree add -q --detach "$w" "$base" || exit 1
    (cd "$w" && nvcc $F -o qlora qlora.cu -lcublasLt -lcublas -lnccl) && cp "$w/qlora" $V/qlora_base
    git worktree remove --force "$w"
  fi
  strip $V/* 2>/dev/null
  du -sh $V ;;
run)
  O=${OUT:-/tmp/verify}; mkdir -p "$O"; S=$O/summary.txt; LIMIT=${LIMIT:-540}
  late() { [ $SECONDS -gt "$LIMIT" ] && { echo "== $1: skipped at ${SECONDS}s (LIMIT)" >>"$S"; return 0; }; return 1; }
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >"$S"
  cp $V/qlora ./qlora
  for t in test_qlora test_attention test_kernels; do
    late $t && continue
    timeout 300 $V/$t >"$O/$t.log" 2>&1; echo "== $t: exit $? at ${SECONDS}s" >>"$S"
    grep -E "FAIL|passed" "$O/$t.log" | tail -12 >>"$S"
  done
  if ! late test_resilience; then
    timeout 200 bash test/test_resilience.sh >"$O/test_resilience.log" 2>&1; echo "== test_resilience: exit $? at ${SECONDS}s" >>"$S"
    grep -E "FAIL|passed" "$O/test_resilience.log" | tail -6 >>"$S"
  fi
  IFS=";" read -ra pgs <<< "${PG-attention_forward:2a,5a,5b,1l,5a64,5c64;attention_backward:4a,6a,6f,4a64,6c64,6f64,6h64;rmsnorm:}"
  for pg in "${pgs[@]}"; do
    name=${pg%%:*}; args=${pg#*:}; late "$name" && continue
    timeout 120 $V/$name $args >>"$O/playgrounds.log" 2>&1; echo "== $name $args: exit $? at ${SECONDS}s" >>"$S"
  done
  ab() {   # ab NAME ARGS...: this tree's trainer, then BASE's
    for q in ./qlora $V/qlora_base; do
      [ -x "$q" ] || continue; late "$1 $q" && continue
      timeout 120 "$q" "${@:2}" >"$O/run.log" 2>&1; echo "== $1 $q: exit $? at ${SECONDS}s" >>"$S"
      grep -E "^memory plan|^  total on the GPU|^step |median" "$O/run.log" >>"$S"; cat "$O/run.log" >>"$O/ab.log"
    done
  }
  ab 8b --model random:llama3-8b --batch 4 --seq 2048 --steps 8 --peak-tflops 772
  ab "8b recompute" --model random:llama3-8b --batch 4 --seq 2048 --steps 8 --recompute --peak-tflops 772
  rm -f "$O/run.log"
  if [ "${LONG:-1}" = 1 ] && ! late 131k; then
    timeout 300 ./qlora --model random:llama3-8b --batch 1 --seq 131072 --steps 1 --recompute --peak-tflops 772 >"$O/long.log" 2>&1
    echo "== 131k: exit $? at ${SECONDS}s" >>"$S"; grep -E "^memory plan|^  total on the GPU|^step |median" "$O/long.log" >>"$S"
  fi
  ab 1b --model random:llama3-1b --batch 4 --seq 2048 --steps 10 --peak-tflops 772
  rm -f "$O/run.log"
  cat "$S" ;;
*)
  sed -n '2,16p' "$0"; exit 2 ;;
esac
