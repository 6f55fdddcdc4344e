#!/usr/bin/env bash
# Create .venv with PyTorch and mlla (editable, with test and export extras). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# Pin torch here only; the package itself asks for torch>=2.1.
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
    .venv/bin/pip install --quiet --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
fi
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[dev,export]"
