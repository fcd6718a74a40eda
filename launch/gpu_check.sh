#!/bin/bash
# GPU machine check: versions and devices, FBGEMM CUDA kernels, each model training 200 steps on the
# GPU (bf16 dense) with samples/s, an NCCL process group over the local GPUs, FAISS GPU vs CPU.
# Prints one JSON summary on stdout (progress on stderr) and exits 1 when any check failed. Sized to
# finish in under 5 minutes on a GPU node; see launch/gpu_check.py for the checks and options.
#
#   launch/gpu_check.sh                      # on the GPU machine
#   launch/gpu_check.sh --out gpu_check.json # also keep the summary in a file
#   launch/gpu_check.sh --dry-run            # no GPU: CPU training, gloo, FAISS CPU; GPU checks skipped
#
# The interpreter: $PYTHON if set, else the repository's .venv, else python3 from PATH (the image's
# /opt/venv in the Docker image).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n "${PYTHON:-}" ]]; then
  PY=$PYTHON
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
  PY=$ROOT/.venv/bin/python
else
  PY=$(command -v python3)
fi

# In a checkout, run from its root (configs/ and the package); in an installed copy (the Docker
# image), from the current directory, whose configs/ the check uses.
if [[ -d "$ROOT/configs" ]]; then
  cd "$ROOT"
fi
export WANDB_MODE=${WANDB_MODE:-offline}
exec "$PY" -m launch.gpu_check "$@"
