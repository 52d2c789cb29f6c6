#!/usr/bin/env bash
# Idempotent set-up: .venv with the CPU dependency set of shared/spec/ENVIRONMENT.md, r1pipe editable.
# Re-running with nothing changed only compares a stamp and returns.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv
stamp="$venv/.r1pipe-setup-stamp"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip setuptools wheel
# torch first and pinned, so nothing later pulls a multi-GB CUDA build.
"$py" -m pip install -q "torch==2.13.0"
"$py" -m pip install -q -e ".[cpu]"
# The registry's torchvision/torchaudio/torchcodec do not match the CPU torch and break
# `import transformers` model modules ("operator torchvision::nms does not exist").
"$py" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
echo "$want" > "$stamp"
echo "r1pipe: environment ready in $venv"
