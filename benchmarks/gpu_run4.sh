#!/usr/bin/env bash
# Device call 4 (short): GPU correctness of the current default code paths.
export PYTHONUNBUFFERED=1
timeout 55 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_kernels_gpu.py \
  -k "(bits_dtypes and (dtype0 or dtype1-4 or dtype2-4)) or gated_mlp or tilings" 2>&1 | tail -25
