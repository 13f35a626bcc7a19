#!/usr/bin/env bash
# Regenerates the paper's tables from whatever inputs are given; a missing input skips its table
# (said on stderr). Every table lands in $OUT/<name>/ (json + md; the HQ table also tex, csv, png).
#
#   HQ_CSV=hq.csv FERD_JSONL=ferd.jsonl AFFECTNET_JSONL=affectnet.jsonl \
#   WORKDIR=workdirs/hq DATA_DIR=~/tensorflow_datasets RESOLUTION=224 \
#   FERD_IMAGES=ferd_images/ OUT=out bash experiments/reproduce.sh
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-out}
RESOLUTION=${RESOLUTION:-224}
skip() { echo "skipped $1: $2" >&2; }

if [[ -n "${HQ_CSV:-}" ]]; then
  extra=()
  if [[ -n "${WORKDIR:-}" && -f "$WORKDIR/eval/hq_model.csv" ]]; then extra=(--extra="$WORKDIR/eval/hq_model.csv"); fi
  $PY -m emonet_jax.evaluate.agreement --ratings="$HQ_CSV" --out="$OUT/hq" "${extra[@]}"
else skip "HQ agreement table" "HQ_CSV (the published hq.csv) not set"; fi

if [[ -n "${FERD_JSONL:-}" ]]; then
  $PY -m emonet_jax.evaluate.transfer --scores="$FERD_JSONL" --dataset=ferd --out="$OUT/ferd"
else skip "FERD table (published outputs)" "FERD_JSONL not set"; fi

if [[ -n "${AFFECTNET_JSONL:-}" ]]; then
  $PY -m emonet_jax.evaluate.transfer --scores="$AFFECTNET_JSONL" --dataset=affectnet --out="$OUT/affectnet"
else skip "AffectNet table (published outputs)" "AFFECTNET_JSONL not set"; fi

if [[ -n "${WORKDIR:-}" ]]; then
  if [[ -n "${DATA_DIR:-}" ]]; then
    $PY -m emonet_jax.evaluate.binary --workdir="$WORKDIR" --data_dir="$DATA_DIR" --resolution="$RESOLUTION" \
      --out="$OUT/binary"
  else skip "Binary table" "DATA_DIR (prepared emonet_face_binary records) not set"; fi
  if [[ -n "${FERD_IMAGES:-}" ]]; then
    $PY -m emonet_jax.evaluate.transfer --images="$FERD_IMAGES" --dataset=ferd --workdir="$WORKDIR" --out="$OUT/ferd_ours"
  else skip "FERD table of our model" "FERD_IMAGES not set"; fi
  if [[ -n "${AFFECTNET_IMAGES:-}" ]]; then
    $PY -m emonet_jax.evaluate.transfer --images="$AFFECTNET_IMAGES" --dataset=affectnet --workdir="$WORKDIR" \
      --out="$OUT/affectnet_ours"
  else skip "AffectNet table of our model" "AFFECTNET_IMAGES not set"; fi
else skip "tables of our model (Binary, FERD/AffectNet transfer)" "WORKDIR (a training run) not set"; fi
