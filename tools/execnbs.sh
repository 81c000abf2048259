#!/usr/bin/env bash
# Execute notebooks in place so their outputs document the code, then clean them. Usage: tools/execnbs.sh nbs/03_logstore.ipynb ...
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg
for nb in "$@"; do
  (cd "$(dirname "$nb")" && ../.venv/bin/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=900 "$(basename "$nb")")
  .venv/bin/nbdev_clean --fname "$nb"
done
