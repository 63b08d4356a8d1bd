#!/usr/bin/env bash
# dev/data/seeds.sh TRAINER "SEEDS" [extra flags...]
#
# Runs the `make train` recipe once per seed with TRAINER (./qlora or ./qlora_cpu) and prints one
# line per seed (seed, final validation loss, accuracy), then `mean X% min Y%` over the seeds.
#
#   dev/data/seeds.sh ./qlora_cpu "1 2 3 4 5" --threads 2
#   dev/data/seeds.sh ./qlora "1 2 3 4 5" --steps 1200 --lr 2e-3
#
# The recipe is TRAIN_ARGS from the Makefile (an environment TRAIN_ARGS overrides it, as it does for
# make); the extra flags come after it, so they override its values (--steps 1200 wins over the
# Makefile's --steps 2400). Each run's full log goes to $LOGDIR/<tag>.seed<S>.log (LOGDIR default
# build/seeds), its adapter to $LOGDIR/adapter. Run from the repository root.
set -u
if [ $# -lt 2 ]; then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
trainer=$1; seeds=$2; shift 2
case $trainer in */*) trainer=$(cd "$(dirname "$trainer")" && pwd)/$(basename "$trainer") ;; esac
cd "$(dirname "$0")/../.." || exit 2
[ -x "$trainer" ] || { echo "seeds.sh: $trainer is not an executable (make qlora_cpu, or make qlora with nvcc)" >&2; exit 2; }

# TRAIN_ARGS as make sees it: the Makefile's `TRAIN_ARGS ?= ...` (backslash-continued lines joined)
# unless the environment sets it
if [ -z "${TRAIN_ARGS:-}" ]; then
    TRAIN_ARGS=$(awk '/^TRAIN_ARGS[ \t]*\?=/ { on = 1; sub(/^TRAIN_ARGS[ \t]*\?=/, "") }
                      on { c = sub(/\\[ \t]*$/, ""); printf "%s ", $0; if (!c) exit }' Makefile | tr -s ' \t' ' ' | sed 's/^ //; s/ $//')
    [ -n "$TRAIN_ARGS" ] || { echo "seeds.sh: no TRAIN_ARGS in the Makefile" >&2; exit 2; }
fi

logdir=${LOGDIR:-build/seeds}
mkdir -p "$logdir"
tag=$(basename "$trainer")$(printf '_%s' "$@" | tr -c 'A-Za-z0-9._=-' '_')
[ ${#tag} -gt 150 ] && tag=${tag:0:150}
echo "recipe: $TRAIN_ARGS $*"

accs=()
for s in $seeds; do
    log="$logdir/$tag.seed$s.log"
    t0=$(date +%s.%N)
    # shellcheck disable=SC2086  # TRAIN_ARGS is a flag list
    "$trainer" $TRAIN_ARGS --out "$logdir/adapter" --log-every 100 "$@" --seed "$s" > "$log" 2>&1
    rc=$?
    t1=$(date +%s.%N)
    line=$(grep '^after: ' "$log" | tail -1)
    if [ $rc -ne 0 ] || [ -z "$line" ]; then
        printf 'seed %-6s FAILED (exit %d): see %s\n' "$s" "$rc" "$log"
        accs+=(0)
        continue
    fi
    # after: val loss 0.0250 | accuracy 196/200 = 98.0% (greedy, exact match) (7.8 s)
    loss=$(sed -n 's/^after: val loss \([^ ]*\) .*/\1/p' <<<"$line")
    right=$(sed -n 's/.*accuracy \([0-9]*\)\/\([0-9]*\) = \([0-9.]*\)%.*/\1\/\2/p' <<<"$line")
    pct=$(sed -n 's/.*accuracy [0-9]*\/[0-9]* = \([0-9.]*\)%.*/\1/p' <<<"$line")
    printf 'seed %-6s val loss %-8s accuracy %-8s = %5s%%  (%.0f s)\n' "$s" "$loss" "$right" "$pct" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')"
    accs+=("$pct")
done
printf '%s\n' "${accs[@]}" | awk -v r="$*" '{ s += $1; if (NR == 1 || $1 < m) m = $1 } END { printf "mean %.1f%% min %.1f%%  over %d seeds  | %s\n", s / NR, m, NR, r }'
