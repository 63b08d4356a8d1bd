#!/usr/bin/env bash
# Runs each test binary given, shows its output, and sums the "N passed, N failed" lines it ends
# with. A binary that exits non-zero or prints no summary counts as one failure. The last line is
# the total, in the same form. Exit status: 0 only if nothing failed.
pass=0; fail=0; skipped=()
for t in "$@"; do
  echo "=== $t"
  out=$("$t" 2>&1); rc=$?
  echo "$out"
  line=$(echo "$out" | grep -E '^[0-9]+ passed, [0-9]+ failed$' | tail -n1)
  if [ -z "$line" ]; then echo "!!! $t printed no summary (exit $rc)"; fail=$((fail + 1)); continue; fi
  p=${line%% passed*}; f=${line#*, }; f=${f%% failed*}
  pass=$((pass + p)); fail=$((fail + f))
  if [ $rc -ne 0 ] && [ "$f" -eq 0 ]; then echo "!!! $t exited $rc"; fail=$((fail + 1)); fi
  echo "$out" | grep -q '^SKIPPED ' && skipped+=("$(basename "$t")")
done
echo "==="
[ ${#skipped[@]} -gt 0 ] && echo "GPU tests skipped (no CUDA device): ${skipped[*]}"
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
