#!/usr/bin/env bash
# Idempotent development/CI setup: .venv, a pinned ComfyUI (or $COMFYUI_PATH), the pack linked in.
# See scripts/setup_env.py for the details. Safe to run again: finished steps are skipped quickly.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
exec "$py" "$here/setup_env.py" "$@"
