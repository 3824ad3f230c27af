#!/usr/bin/env bash
# The whole rehearsal on this machine: a tiny Gemma 3 and synthetic Oxford-IIIT pets, the local
# emulator standing in for Google Cloud, then the same commands a user runs against a real project.
set -euo pipefail
cd "$(dirname "$0")/.."

DEMO=${DEMO_DIR:-.demo}
rm -rf "$DEMO"
mkdir -p "$DEMO"

echo "== Building a tiny Gemma 3 and a synthetic Oxford-IIIT Pet set (offline)"
python -m trainer.offline.tiny "$DEMO/tiny-gemma3"
python -m trainer.offline.synthetic "$DEMO/oxford-iiit-pet" --per-class 20 --test-per-class 6

echo "== Starting the local emulator (a project granted one Cloud Run GPU)"
gemma-launch emulator start --data-dir "$DEMO/cloud" --gpu-quota 1 >"$DEMO/emulator.env" 2>"$DEMO/emulator.log" &
EMULATOR_PID=$!
trap 'kill $EMULATOR_PID 2>/dev/null || true; wait $EMULATOR_PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  [ "$(grep -c '^export' "$DEMO/emulator.env" || true)" -ge 2 ] && break
  sleep 0.1
done
cat "$DEMO/emulator.env"
eval "$(cat "$DEMO/emulator.env")"

export PROJECT_ID=demo-project
# A stand-in token, made up at run time: the emulator's Secret Manager keeps it; it is never printed.
HF_TOKEN="hf_demo_$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')"
export HF_TOKEN
cp scripts/demo.toml "$DEMO/gemma-launch.toml"
cd "$DEMO"

echo "== gemma-launch up"
gemma-launch up --model-source tiny-gemma3 --dataset-source oxford-iiit-pet

echo "== gemma-launch up (again: nothing to do)"
gemma-launch up --model-source tiny-gemma3 --dataset-source oxford-iiit-pet

echo "== gemma-launch run --follow"
gemma-launch run --follow

echo "== gemma-launch status"
gemma-launch status

echo "== gemma-launch results"
gemma-launch results

echo "== gemma-launch report"
gemma-launch report

echo "== gemma-launch down (the bucket, with the results, stays)"
gemma-launch down
