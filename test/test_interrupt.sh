#!/usr/bin/env bash
# test_interrupt.sh (GPU): Ctrl-C in the middle of a run, then --resume, must give the same losses,
# bit for bit, as the run that was never interrupted; the interrupted run must exit 0 and leave a
# loadable adapter + state. Losses are logged with 9 significant digits (exact for fp32).
if ! nvidia-smi -L > /dev/null 2>&1 || [ ! -x ./qlora ]; then
  echo "SKIPPED test_interrupt: no CUDA device"; echo "0 passed, 0 failed"; exit 0
fi
d=build/tmp_interrupt; rm -rf $d; mkdir -p $d
args="--model random:tiny --batch 2 --seq 256 --steps 3000 --lr 1e-3 --seed 7 --dropout 0.1"
pass=0; fail=0
ok() { if [ "$1" = 0 ]; then echo "  ok   $2"; pass=$((pass + 1)); else echo "  FAIL $2"; fail=$((fail + 1)); fi; }
./qlora $args --log $d/full.log > $d/full.out 2>&1; ok $? "uninterrupted run of 3000 steps"
./qlora $args --out $d/ckpt --log $d/part.log > $d/part.out 2>&1 & pid=$!
for i in $(seq 1 600); do grep -qE '^step +200/' $d/part.log 2> /dev/null && break; sleep 0.05; done
kill -INT $pid; wait $pid; rc=$?
ok $rc "SIGINT after step 200: exit status $rc, saved at step $(grep -o 'saving at step [0-9]*' $d/part.out | grep -o '[0-9]*$')"
[ -f $d/ckpt/state.safetensors ] && [ -f $d/ckpt/adapter_model.safetensors ]; ok $? "adapter and state written"
./qlora $args --resume $d/ckpt --out $d/ckpt --log $d/part.log >> $d/part.out 2>&1; ok $? "resumed run finishes"
losses() { grep -oE '^step +[0-9]+/[0-9]+ \| loss [^ ]+' "$1"; }
diff <(losses $d/full.log) <(losses $d/part.log) > $d/diff.txt; r=$?
ok $r "interrupted + resumed losses == uninterrupted losses, all $(losses $d/full.log | wc -l) steps, bit for bit"
echo "$pass passed, $fail failed"
[ $fail = 0 ]
