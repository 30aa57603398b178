#!/usr/bin/env bash
# Quickstart, the README's main command. On a fresh machine it:
#   1. sets up .venv (first run only),
#   2. generates the shapes dataset (coloured shapes + captions, with a held-out split) and trains a tokenizer,
#   3. trains the tiny GenLIP on CPU (examples/configs/quickstart.yaml) and saves a checkpoint,
#   4. captions the held-out images greedily and prints them next to the true captions, with the exact-match rate.
# Extra arguments go to genlip-pretrain, e.g. `bash scripts/quickstart.sh training.train_iters=50`.
# Environment: GENLIP_QUICKSTART_DATA (default data/quickstart), GENLIP_QUICKSTART_RUN (default runs/quickstart).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
BIN=.venv/bin
DATA="${GENLIP_QUICKSTART_DATA:-data/quickstart}"
RUN="${GENLIP_QUICKSTART_RUN:-runs/quickstart}"

if [[ ! -f "$DATA/shapes/manifest.json" ]]; then
    echo "[quickstart] generating the shapes dataset in $DATA/shapes"
    "$BIN/genlip-data" make-shapes --out "$DATA/shapes" --samples 6000 --shards 8 --seed 0 > /dev/null
fi
if [[ ! -f "$DATA/tok/tokenizer.model" ]]; then
    echo "[quickstart] training a SentencePiece tokenizer on the captions"
    "$BIN/genlip-data" train-tokenizer --shards "$DATA/shapes/train/*.tar" --out "$DATA/tok" --vocab-size 500
fi

echo "[quickstart] training: $BIN/genlip-pretrain --config examples/configs/quickstart.yaml $*"
"$BIN/genlip-pretrain" --config examples/configs/quickstart.yaml \
    "data.sources=$DATA/shapes/train/*.tar" "data.tokenizer_path=$DATA/tok/tokenizer.model" \
    "training.run_dir=$RUN" "$@"

echo "[quickstart] greedy captions of the held-out images (checkpoint $RUN/checkpoints):"
"$BIN/genlip-caption" --checkpoint "$RUN/checkpoints" --shards "$DATA/shapes/heldout/*.tar" \
    --max-new-tokens 16 --batch-size 32
