#!/usr/bin/env bash
# Execute notebooks in place (honouring #| eval: false and tst_flags) and clean them. See tools/execnbs.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python tools/execnbs.py "$@"
