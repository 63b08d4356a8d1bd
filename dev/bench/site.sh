#!/usr/bin/env bash
# dev/bench/site.sh [DIR]: the Unsloth anchor's packages (../shared/bench/UNSLOTH.md), unpacked into DIR
# (default .site, ignored by git) for the GPU machine, whose torch/transformers/peft stay its own:
#   dev/bench/site.sh && SITE=.site dev/bench/compare.sh      (carry .site to the device)
# Wheels for CPython 3.12 on manylinux x86-64 (the GPU machine's python3); about 31 MB once pruned of
# what is never imported (unsloth's studio/ and unsloth_cli/, the other CUDA versions' bitsandbytes).
set -euo pipefail
dir=${1:-.site}
pkgs="unsloth==2026.10.9 unsloth_zoo==2026.10.9 bitsandbytes==0.50.2 trl==1.15.0 datasets==4.8.5
      dill==0.4.1 multiprocess==0.70.19 cut_cross_entropy==25.1.1 msgspec==0.23.0"
whl=$(mktemp -d); trap 'rm -rf "$whl"' EXIT
for p in $pkgs; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$whl" "$p" || { echo "site.sh: pip download $p failed" >&2; exit 1; }
done
rm -rf "$dir"; mkdir -p "$dir"
for w in "$whl"/*.whl; do python3 -m zipfile -e "$w" "$dir"; done
rm -rf "$dir/studio" "$dir/unsloth_cli" "$dir/unsloth/studio"
find "$dir/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*cuda130*' ! -name '*_cpu*' -delete
echo "$dir: $(du -sh "$dir" | cut -f1), $(ls "$dir" | grep -c dist-info) packages"
