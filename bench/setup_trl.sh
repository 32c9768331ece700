#!/usr/bin/env bash
# Install TRL in its own virtual environment, bench/.trl-venv (git-ignored; not a project dependency), for
# bench/grpo_vs_trl.py. torch is pinned to the project's CPU build (2.13.0: pip takes the local CPU wheel
# instead of a multi-GB CUDA build) and transformers to the project's version, which TRL accepts.
#
#   bash bench/setup_trl.sh            # ~1-2 min; re-running is a no-op when TRL imports already
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/bench/.trl-venv"
TRL_VERSION="${TRL_VERSION:-1.16.0}"
if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "import trl, torch" 2>/dev/null; then
  echo "TRL already installed in $VENV"; exit 0
fi
python3.11 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "trl==$TRL_VERSION" "torch==2.13.0" "transformers==5.19.0" \
  "accelerate==1.15.0" "datasets==5.2.0" "tokenizers==0.23.3"
"$VENV/bin/python" -c "import trl, torch, transformers; print('trl', trl.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
