#!/bin/bash
# The B/16 train step, ours against the PyTorch ViT, taking turns on one machine.
#
#   make install torch-venv
#   bash benchmarks/train_step_vs_torch.sh ROUNDS DTYPE BATCH     # e.g. 3 bfloat16 16
#
# Each round runs `python -m emonet_jax.bench train_step` and then `benchmarks/torch_vit_step.py`
# with the same variant, resolution, batch, steps and dtype, and prints for each run one line:
# round, who, the 1-minute load average at its start, median s/step, median CPU s/step, loss.
# Taking turns spreads a shared machine's slow spells over both sides.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:?rounds}; dtype=${2:?float32 or bfloat16}; batch=${3:?batch}
args="--variant=B/16 --res=224 --batch=$batch --steps=3 --dtype=$dtype"
summary='import json, sys; d = json.loads(sys.stdin.read().strip().splitlines()[-1]); '\
'print(round(d["median_step_s"], 3), round(d["median_step_cpu_s"], 2), d.get("loss"))'
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for round in $(seq "$rounds"); do
  for who in ours torch; do
    load=$(cut -d' ' -f1 /proc/loadavg)
    if [ "$who" = ours ]; then
      command=".venv/bin/python -m emonet_jax.bench train_step $args"
    else
      command=".venv-torch/bin/python benchmarks/torch_vit_step.py $args"
    fi
    out=$($command 2>"$log") || { echo "round $round: '$command' failed; its stderr:" >&2; tail -20 "$log" >&2; exit 1; }
    echo "$round $who load=$load $(echo "$out" | python3 -c "$summary")"
  done
done
