#!/usr/bin/env bash
# test_dist_gpu.sh (GPU), data parallelism (dist.h) through the trainer binary:
#   - world size 1 through the distributed path (RANK=0 WORLD_SIZE=1 and --dist-init file: or tcp:,
#     so NCCL all-reduces every step) gives the plain run's losses and grad norms bit for bit, and
#     the same adapter and resume state, byte for byte (a token file, --grad-accum 2, LoRA dropout);
#   - a rank whose peer never comes exits 1 within --dist-timeout, naming the missing rank;
#   - with 2 GPUs or more: 2 ranks of B rows against one GPU of 2B rows (no dropout): the same data,
#     so the same losses to rounding (not bit for bit: the GEMMs see other shapes and the gradient sum
#     is taken in another order); both ranks finish, which means their adapters were bit-identical at
#     the end (the binary compares them); a rank killed mid-run makes the other exit 1, not hang.
if ! nvidia-smi -L > /dev/null 2>&1 || [ ! -x ./qlora ]; then
  echo "SKIPPED test_dist_gpu: no CUDA device"; echo "0 passed, 0 failed"; exit 0
fi
if ! ldd ./qlora | grep -q libnccl; then
  echo "SKIPPED test_dist_gpu: ./qlora was built without NCCL"; echo "0 passed, 0 failed"; exit 0
fi
d=build/tmp_dist_gpu; rm -rf $d; mkdir -p $d
pass=0; fail=0
ok() { if [ "$1" = 0 ]; then echo "  ok   $2"; pass=$((pass + 1)); else echo "  FAIL $2"; fail=$((fail + 1)); fi; }
steps() { grep -oE '^step +[0-9]+/[0-9]+ \| loss [^ ]+ \| lr [^ ]+ \| norm [^ ]+' "$1"; }
port=$((20000 + RANDOM % 20000))

args="--model data/base --train data/task/reverse.train.tok --batch 8 --seq 64 --steps 40 --grad-accum 2 --dropout 0.1 --lr 3e-3 --seed 3"
./qlora $args --log $d/plain.log --out $d/plain > $d/plain.out 2>&1; ok $? "plain run: 40 steps"
for how in file:$d/rdzv tcp:127.0.0.1:$port; do
  name=${how%%:*}
  RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 ./qlora $args --dist-init $how --log $d/$name.log --out $d/$name > $d/$name.out 2>&1; rc=$?
  grep -q '^data parallel: 1 rank ' $d/$name.out; ok $((rc + $?)) "world size 1 through NCCL (--dist-init $how): exit $rc, $(grep -oE 'NCCL [0-9.]+' $d/$name.out)"
  diff <(steps $d/plain.log) <(steps $d/$name.log) > /dev/null && [ "$(steps $d/plain.log | wc -l)" = 40 ]
  ok $? "... losses, lr and grad norms == the plain run's, all 40 steps, bit for bit (last: $(steps $d/$name.log | tail -n1 | grep -oE 'loss [^ ]+'))"
  cmp -s $d/plain/adapter_model.safetensors $d/$name/adapter_model.safetensors && cmp -s $d/plain/state.safetensors $d/$name/state.safetensors
  ok $? "... adapter and resume state == the plain run's, byte for byte"
done
RANK=0 WORLD_SIZE=2 LOCAL_RANK=0 timeout 60 ./qlora $args --dist-init file:$d/never --dist-timeout 3 > $d/never.out 2>&1; rc=$?
[ $rc = 1 ] && grep -q 'rank 1 did not arrive' $d/never.out; ok $? "world size 2, rank 1 never starts: rank 0 exits $rc after --dist-timeout 3: $(grep -o 'rank 1 did not arrive[^(]*' $d/never.out)"

if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  two="--model data/base --train data/task/reverse.train.tok --seq 64 --steps 40 --lr 3e-3 --seed 3"
  ./qlora $two --batch 16 --log $d/one.log > $d/one.out 2>&1; ok $? "one GPU, batch 16"
  for r in 0 1; do RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r ./qlora $two --batch 8 --dist-init file:$d/rdzv2 --log $d/two.log > $d/two.$r.out 2>&1 & pids[$r]=$!; done
  wait ${pids[0]}; rc0=$?; wait ${pids[1]}; rc1=$?
  [ $rc0 = 0 ] && [ $rc1 = 0 ]; ok $? "2 GPUs x batch 8: both ranks exit 0 (exits $rc0 $rc1; the adapters compared equal at the end)"
  cmp=$(paste <(steps $d/one.log | grep -oE 'loss [^ ]+' | cut -d' ' -f2) <(steps $d/two.log | grep -oE 'loss [^ ]+' | cut -d' ' -f2) |
        awk '{ r = ($1 - $2) / $1; if (r < 0) r = -r; if (NR == 1) first = r; if (r > m) m = r; n++ }
             END { printf "%d %.3g %.3g %d\n", n, first, m, (n == 40 && first < 2e-3 && m < 2e-2) ? 0 : 1 }')
  set -- $cmp
  ok ${4:-1} "... losses == one GPU's of batch 16 to rounding: ${1:-0} steps, step 1 rel diff ${2:-?} (< 2e-3), max ${3:-?} (< 2e-2)"
  for r in 0 1; do RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r ./qlora $two --batch 8 --steps 100000 --dist-init tcp:127.0.0.1:$((port + 1)) \
    --dist-timeout 20 --log $d/kill.log > $d/kill.$r.out 2>&1 & pids[$r]=$!; done
  for i in $(seq 1 600); do grep -qE '^step +50/' $d/kill.log 2> /dev/null && break; sleep 0.1; done
  kill -9 ${pids[1]}; t0=$(date +%s); wait ${pids[0]}; rc=$?; t1=$(date +%s)
  [ $rc = 1 ] && grep -q 'rank 0 of 2' $d/kill.0.out; ok $? "rank 1 killed at step 50: rank 0 exits $rc after $((t1 - t0)) s (--dist-timeout 20): $(grep -o 'rank 0 of 2: .*' $d/kill.0.out | head -c 160)"
else
  echo "  (one GPU: the 2-rank checks need 2)"
fi
echo "$pass passed, $fail failed"
[ $fail = 0 ]
