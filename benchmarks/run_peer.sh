#!/usr/bin/env bash
# On the device machine: nano-vLLM (with the flash-attn wheel) from .peer/ (staged by ../shared/peer/stage.sh)
# on named workloads. Usage: bash benchmarks/run_peer.sh --model DIR --workload NAME [NAME ...] [--tp N]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
site=${TMPDIR:-/tmp}/peer-site src=${TMPDIR:-/tmp}/peer-src
[ -d "$site/flash_attn" ] || python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "$root"/.peer/flash_attn-*.whl
[ -d "$src/nano-vllm" ] || { mkdir -p "$src" && tar xzf "$root"/.peer/nano-vllm-*.tar.gz -C "$src"; }
cd "$src/nano-vllm"
PYTHONPATH="$src/nano-vllm:$site" python3 "$root/benchmarks/peer.py" "$@" 2>&1 | grep -E '^\{|Error' | tail -n 12
