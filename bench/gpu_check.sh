#!/usr/bin/env bash
# The README's GPU figures in one run, on a machine with CUDA:
#   bash bench/gpu_check.sh [MODEL]        MODEL: a Whisper name or .pt file (default tiny.en)
# 1. the GPU tests; 2. the capacity sweep through sockets on the shipped real clip, each policy
# (coarse levels: a GPU holds hundreds of streams); 3. the engine's rounds for `small` with
# random fp16 weights (30-s windows, as the server runs). PY picks the interpreter (default python).
# On a lent machine with no network, carry tiny.en with bench/carry_model.py and pass the .pt.
set -u
PY=${PY:-python}
MODEL=${1:-tiny.en}
PORT=${PORT:-8011}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
cd "$(dirname "$0")/.."
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1

echo "== GPU tests"
$PY -m pytest -q -ra -p no:cacheprovider tests/test_gpu.py | tail -5

for policy in localagreement alignatt; do
  echo "== capacity, --policy $policy"
  $PY -m streamserver --model "$MODEL" --pcm-input --port "$PORT" --policy "$policy" \
      --max-connections-per-gpu 512 --log-level warning &
  server=$!
  for _ in $(seq 120); do
    $PY -c "import httpx; httpx.get('http://127.0.0.1:$PORT/health').raise_for_status()" 2>/dev/null && break
    sleep 1
  done
  $PY bench/capacity.py --url "ws://127.0.0.1:$PORT/asr" --levels 1,16,32,64,128,192,256 --max-streams 512 \
      --lag-limit 3.0 --stagger 0.02
  kill -INT "$server"; wait "$server"
done

echo "== engine rounds, small (random fp16 weights), 30-s windows"
$PY bench/engine_throughput.py --model small --random --streams 1,32,64,128,256 --repeats 2
