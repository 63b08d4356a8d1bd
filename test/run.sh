#!/usr/bin/env bash
# Runs each test given, shows its output, and sums the "N passed, N failed" lines it ends with. A
# test that exits non-zero or prints no summary counts as one failure. A test that cannot run here
# prints "SKIPPED name: why" (or "SKIPPED why") and counts nothing; the skipped tests are listed at
# the end, grouped by why. The last line is the total, in the same form. Exit status: 0 only if
# nothing failed.
pass=0; fail=0; reasons=(); declare -A skipped   # reasons: in first-seen order; skipped[why] = tests
for t in "$@"; do
  echo "=== $t"
  out=$("$t" 2>&1); rc=$?
  echo "$out"
  line=$(echo "$out" | grep -E '^[0-9]+ passed, [0-9]+ failed$' | tail -n1)
  if [ -z "$line" ]; then echo "!!! $t printed no summary (exit $rc)"; fail=$((fail + 1)); continue; fi
  p=${line%% passed*}; f=${line#*, }; f=${f%% failed*}
  pass=$((pass + p)); fail=$((fail + f))
  if [ $rc -ne 0 ] && [ "$f" -eq 0 ]; then echo "!!! $t exited $rc"; fail=$((fail + 1)); fi
  s=$(echo "$out" | grep -m1 '^SKIPPED ') || continue
  why=${s#SKIPPED }
  name=${why%%: *}
  [ "$name" != "$why" ] && [[ $name != *" "* ]] && why=${why#*: }   # drop the test's own name
  [ -z "${skipped[$why]+x}" ] && reasons+=("$why")
  skipped[$why]+="${skipped[$why]:+, }$(basename "$t")"
done
echo "==="
for why in "${reasons[@]}"; do echo "skipped: ${skipped[$why]} ($why)"; done
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
