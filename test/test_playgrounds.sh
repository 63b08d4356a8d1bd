#!/usr/bin/env bash
# test_playgrounds.sh (needs nvcc, not a GPU): every kernel playground in dev/cuda/ still compiles
# against the headers it includes (kernels/, qlora.h), for sm_90a as its header says to build it.
# A playground is where a kernel's versions are kept and timed; a header change that breaks one
# (a name it defines itself, now also in qlora.h) goes unseen until a device session needs it.
NVCC=${NVCC:-nvcc}
if ! command -v "$NVCC" > /dev/null 2>&1; then
  echo "SKIPPED test_playgrounds: no nvcc"; echo "0 passed, 0 failed"; exit 0
fi
d=build/tmp_playgrounds; rm -rf $d; mkdir -p $d
for f in dev/cuda/*.cu; do
  b=$(basename "$f" .cu)
  "$NVCC" -std=c++17 -O3 -gencode arch=compute_90a,code=sm_90a -o "$d/$b" "$f" -lcublas -lcublasLt > "$d/$b.log" 2>&1 &
done
wait
pass=0; fail=0
for f in dev/cuda/*.cu; do
  b=$(basename "$f" .cu)
  if [ -x "$d/$b" ]; then echo "  ok   $f compiles (sm_90a)"; pass=$((pass + 1))
  else echo "  FAIL $f does not compile (sm_90a):"; grep -m3 'error' "$d/$b.log" | sed 's/^/         /'; fail=$((fail + 1)); fi
done
echo "$pass passed, $fail failed"
[ $fail -eq 0 ]
