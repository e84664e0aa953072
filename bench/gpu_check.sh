#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): on a CUDA machine, ours against diffusers at SD1.5 shapes and the ci
# profile end to end on the GPU, in under 8 minutes; writes bench/gpu_check.md. Without CUDA it says so and
# exits 0; --dry-run runs the same code on the CPU at tiny shapes.
set -euo pipefail
cd "$(dirname "$0")/.."
python=python3
if [ -x .venv/bin/python ]; then python=.venv/bin/python; fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1
exec timeout 900 "$python" bench/gpu_check.py "$@"
