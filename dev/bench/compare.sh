#!/usr/bin/env bash
# Side by side on one GPU: ./qlora, the Hugging Face QLoRA anchor (transformers + peft + bitsandbytes)
# and the Unsloth anchor on the same shapes (4 x 2048 tokens, LoRA r 16 on all linears, random tokens),
# plus the measured bf16 GEMM peak that the MFU columns are taken against.
#   dev/bench/compare.sh [ANCHOR_DIR]     ANCHOR_DIR: gemm_peak.py, hf_qlora.py, unsloth_qlora.py (default
#                                         ../shared/bench; a copy inside the repo works the same:
#                                         cp -r ../shared/bench .bench && dev/bench/compare.sh .bench)
# Rows and anchors (environment):
#   CONFIGS="llama3-8b 1 11,qwen3-8b 0"  which "shape recompute [GiB]" rows; GiB: ./qlora's --gpu-memory
#                                      (default: the four llama rows of the README, llama3-8b with recompute
#                                      at issue 14's 11 GiB, and the four Qwen rows; "" none)
#   ANCHORS="hf unsloth"               which anchors run (default both; "" = ./qlora alone)
#   LONG=1                             also one llama3-8b sequence of 131,072 tokens (recompute on)
#   SITE=.site                         the unpacked Unsloth packages + bitsandbytes (../shared/bench/UNSLOTH.md);
#                                      the Unsloth runs get PYTHONPATH=$SITE, the HF runs its bitsandbytes alone
#                                      when python3 has none of its own
#   OUT=dir                            where the raw JSON lines (results.jsonl), each run's log and the table
#                                      go (default /tmp/qlora_compare)
#   RUN_TIMEOUT=900  BUDGET_S=0        seconds for one anchor run; the whole script (0: no limit): a run
#                                      that would start past the budget is skipped, shown as "skip"
# The llama rows' HF anchor is hf_qlora.py from ANCHOR_DIR; the Qwen rows' is dev/bench/hf_anchor.py
# (same method, same JSON line; HF_ANCHOR=ours uses it for the llama rows too). Unsloth: unsloth_qlora.py
# for llama, dev/bench/unsloth_anchor.py (which drives unsloth_qlora.py) for Qwen; with recompute on it
# runs Unsloth's own gradient checkpointing. A failing run prints its error line and shows as "-" or
# "OOM" in the table; nothing aborts the script.
set -uo pipefail
A=${1:-../shared/bench}
HERE=$(cd "$(dirname "$0")" && pwd)
SITE=$(realpath -m "${SITE:-.site}")
ANCHORS=${ANCHORS-hf unsloth}
O=${OUT:-/tmp/qlora_compare}
mkdir -p "$O/logs"
RAW=$O/results.jsonl
T0=$SECONDS
echo "raw results: $RAW, logs: $O/logs"

has() { case " $ANCHORS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
left() { [ "${BUDGET_S:-0}" = 0 ] && { echo "${RUN_TIMEOUT:-900}"; return; }
         local l=$((BUDGET_S - (SECONDS - T0))); [ $l -gt "${RUN_TIMEOUT:-900}" ] && l=${RUN_TIMEOUT:-900}; echo $l; }
# one JSON line in, "tok_s tflops peak_gib" out ("OOM - -" or "- - -" on a failure, whose error and, for
# Unsloth, stage go to stderr)
cells() { python3 -c "
import json, sys
try:
    d = json.loads(sys.argv[1])
except Exception:
    d = dict(error='not JSON: ' + sys.argv[1][-300:])
e = str(d.get('error', '') if 'tok_s' in d else d.get('error', 'no tok_s'))
if not e:
    print(d['tok_s'], d.get('tflops', '-'), d.get('peak_gib', '-')); sys.exit()
print('   error:', e[:400], '| stage:', d.get('stage', '-'), file=sys.stderr)
print('OOM - -' if e.startswith('OOM') or 'out of memory' in e.lower() else 'skip - -' if e.startswith('skip') else '- - -')" "$1"; }
# run NAME CMD...: the command's last stdout line is its JSON result; everything goes to logs/NAME.log
run() {
  local name=$1; shift
  local t; t=$(left)
  if [ "$t" -le 0 ]; then echo '{"error": "skip: BUDGET_S reached"}'; return; fi
  local line rc
  timeout -k 10 "$t" "$@" >"$O/logs/$name.log" 2>"$O/logs/$name.err"; rc=$?
  line=$(grep '^{' "$O/logs/$name.log" | tail -n1)
  if [ -z "$line" ]; then
    local why="exit $rc"; [ $rc = 124 ] || [ $rc = 137 ] && why="killed at its ${t} s limit (RUN_TIMEOUT/BUDGET_S)"
    line=$(python3 -c "import json,sys; print(json.dumps({'error': sys.argv[1] + ', no JSON line; stderr: ' + sys.argv[2]}))" \
      "$why" "$(grep -v '^\s*$' "$O/logs/$name.err" | tail -n3 | tr '\n' ' ' | tail -c 400)")
  fi
  python3 -c "import json,sys; d=json.loads(sys.argv[1]); d['run']=sys.argv[2]; print(json.dumps(d))" "$line" "$name" >>"$RAW" 2>/dev/null || echo "$line" >>"$RAW"
  echo "$line"
}

peak=$(python3 "$A/gemm_peak.py" | tee -a "$RAW" | python3 -c "import json,sys; d=json.load(sys.stdin); print(d['gemm_8192x8192x8192_tflops'])")
[ -z "$peak" ] && { echo "gemm_peak.py failed: MFU against 1000 TFLOP/s"; peak=1000; }
echo "bf16 GEMM peak (8192^3): $peak TFLOP/s"

# the HF anchor needs bitsandbytes: python3's own, else .site's (alone on the path, not Unsloth's packages)
HFPATH=${PYTHONPATH:-}
if has hf && ! python3 -c "import bitsandbytes" 2>/dev/null && [ -d "$SITE/bitsandbytes" ]; then
  B=/tmp/qlora_compare_bnb; rm -rf "$B"; mkdir -p "$B"
  ln -s "$SITE/bitsandbytes" "$SITE"/bitsandbytes-*.dist-info "$B"/
  HFPATH=$B${PYTHONPATH:+:$PYTHONPATH}
fi
USITE=$SITE${PYTHONPATH:+:$PYTHONPATH}
export UNSLOTH_BENCH_DIR=${UNSLOTH_BENCH_DIR:-/tmp/unsloth_bench}   # the random-init checkpoints Unsloth loads
export UNSLOTH_QLORA=$(realpath -m "$A/unsloth_qlora.py")          # dev/bench/unsloth_anchor.py drives it

rows=()
IFS=, read -ra cfgs <<< "${CONFIGS-llama3-1b 0,llama3-1b 1,llama3-8b 1 11,llama3-8b 0,qwen2.5-7b 1,qwen2.5-7b 0,qwen3-8b 1,qwen3-8b 0}"
for cfg in "${cfgs[@]}"; do
  set -- $cfg; shape=$1; rc=$2; mem=${3:-}
  case $shape in llama3-*) hfs=${shape/llama3-/llama-}; fam=llama ;; *) hfs=$shape; fam=other ;; esac
  hfpy=$HERE/hf_anchor.py; upy=$HERE/unsloth_anchor.py
  if [ $fam = llama ]; then
    [ "${HF_ANCHOR:-}" != ours ] && [ -f "$A/hf_qlora.py" ] && hfpy=$A/hf_qlora.py
    upy=$A/unsloth_qlora.py
  fi
  t=$(left); q=""; ql=$O/logs/qlora-$shape-rc$rc.log
  if [ "$t" -gt 0 ]; then
    timeout -k 10 "$t" ./qlora --model random:$shape --batch 4 --seq 2048 --steps 8 --peak-tflops "$peak" \
      $([ "$rc" = 1 ] && echo --recompute) $([ -n "$mem" ] && echo --gpu-memory "$mem") >"$ql" 2>&1; qrc=$?
    q=$(grep 'median step' "$ql" | tail -n1); [ -z "$q" ] && q="$(tail -n1 "$ql") (exit $qrc)"
  fi
  ours=$(echo "$q" | sed -n 's/.*| \([0-9]*\) tok\/s | MFU \([0-9.]*\)%.*(driver) \([0-9.]*\) GiB.*/\1 \2 \3/p')
  if [ -z "$ours" ]; then
    echo "  qlora $shape rc $rc: ${q:-skipped (BUDGET_S)}"
    ours="- - -"; [ -z "$q" ] && ours="skip - -"; grep -qi "out of memory" "$ql" 2>/dev/null && ours="OOM - -"
  fi
  python3 -c "import json,sys; t=sys.argv[3].split(); print(json.dumps(dict(system='qlora', run='qlora-%s-rc%s' % (sys.argv[1], sys.argv[2]), shape=sys.argv[1], ckpt=int(sys.argv[2]), tok_s=t[0], mfu=t[1], peak_gib_driver=t[2], line=sys.argv[4])))" \
    "$shape" "$rc" "$ours" "$q" >>"$RAW"
  h=("- - -" "- - -"); u="- - -"
  if has hf; then
    i=0
    for up in 1 0; do
      r=$(PYTHONPATH=$HFPATH run "hf-$shape-rc$rc-up$up" python3 "$hfpy" --shape $hfs --batch 4 --seq 2048 --ckpt $rc --upcast $up --steps 6 --warmup 2)
      h[$i]=$(cells "$r"); i=$((i + 1))
    done
  fi
  if has unsloth; then
    if [ -d "$SITE/unsloth" ]; then
      t=$(left); [ "$t" -gt 120 ] && t=$((t - 30))   # its own watchdog first: it prints the stage it was in
      r=$(PYTHONPATH=$USITE run "unsloth-$shape-rc$rc" python3 "$upy" --shape $hfs --batch 4 --seq 2048 --ckpt $rc --steps 6 --warmup 2 --timeout $t)
      u=$(cells "$r")
    else
      echo "  unsloth: no $SITE/unsloth (see ../shared/bench/UNSLOTH.md)"
    fi
  fi
  rows+=("$shape|$rc${mem:+@$mem}|$ours|${h[0]}|${h[1]}|$u")
  # an 8b checkpoint is ~16 GB of /tmp: keep one, the shape's, for its next row
  for d in "$UNSLOTH_BENCH_DIR"/ckpt-*; do [ -e "$d" ] && [ "$d" != "$UNSLOTH_BENCH_DIR/ckpt-$hfs" ] && rm -rf "$d"; done
  echo "$shape recompute $rc: qlora (tok/s MFU GiB) $ours | HF upcast (tok/s TFLOP/s GiB) ${h[0]} | HF bf16 ${h[1]} | Unsloth $u  [$((SECONDS - T0)) s]"
done
# LONG=1: one llama3-8b sequence of 131,072 tokens with recompute (one step: ~2 minutes); the HF anchor
# runs out of memory long before that length (bf16 kept, recompute on, the cheapest recipe it has)
if [ "${LONG:-0}" = 1 ]; then
  q=$(./qlora --model random:llama3-8b --batch 1 --seq 131072 --steps 1 --recompute --peak-tflops "$peak" 2>&1 | tee "$O/logs/qlora-long.log" | grep 'median step' | tail -n1)
  ours=$(echo "$q" | sed -n 's/.*| \([0-9]*\) tok\/s | MFU \([0-9.]*\)%.*(driver) \([0-9.]*\) GiB.*/\1 \2 \3/p')
  [ -z "$ours" ] && ours="- - -"
  h0="- - -"
  if has hf; then
    hfpy=$A/hf_qlora.py; [ -f "$hfpy" ] || hfpy=$HERE/hf_anchor.py
    r=$(PYTHONPATH=$HFPATH run hf-long python3 "$hfpy" --shape llama-8b --batch 1 --seq 131072 --ckpt 1 --upcast 0 --steps 2 --warmup 1)
    h0=$(cells "$r")
  fi
  rows+=("llama3-8b-131k|1|$ours|- - -|$h0|- - -")
fi

# the table: tok/s (MFU against the measured peak, peak memory); qlora's memory is the driver's
# (cudaMemGetInfo), the anchors' torch.cuda.max_memory_allocated
{
printf "\nbf16 GEMM peak %s TFLOP/s; %s\n" "$peak" "$(date -u +%Y-%m-%dT%H:%MZ)"
printf "%-14s %-9s | %-26s | %-24s | %-24s | %-24s | %s\n" model rc "qlora tok/s (MFU, GiB)" "HF upcast tok/s (MFU,GiB)" \
  "HF bf16 tok/s (MFU,GiB)" "Unsloth tok/s (MFU,GiB)" "qlora speedup vs HF upcast / HF bf16 / Unsloth"
for r in "${rows[@]}"; do
  IFS='|' read -r shape rc ours h1 h0 u <<< "$r"
  python3 - "$shape" "$rc" "$ours" "$h1" "$h0" "$u" "$peak" <<'PY'
import sys
shape, rc, ours, h1, h0, u, peak = sys.argv[1:]
def num(x):
    try:
        return float(x)
    except ValueError:
        return None
t, m, g = ours.split()
def cell(c):  # "tok_s tflops gib" -> "tok/s (MFU%, GiB)"
    a, f, gib = c.split()
    if num(a) is None:
        return a
    mfu = f"{100 * num(f) / float(peak):.1f}%" if num(f) is not None else "-"
    return f"{num(a):,.0f} ({mfu}, {gib})"
def sp(c):
    a = num(c.split()[0])
    return f"{num(t) / a:.2f}x" if a and num(t) else "-"
ourc = f"{num(t):,.0f} ({m}%, {g})" if num(t) is not None else t
on = ('on' if rc.split('@')[0] == '1' else 'off') + (' <=%sG' % rc.split('@')[1] if '@' in rc else '')
print(f"{shape:<14} {on:<9} | {ourc:<26} | {cell(h1):<24} | {cell(h0):<24} | {cell(u):<24} | "
      f"{sp(h1)} / {sp(h0)} / {sp(u)}")
PY
done
} | tee "$O/table.txt"
