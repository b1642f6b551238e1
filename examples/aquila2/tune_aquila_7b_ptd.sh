#!/bin/bash
# Aquila-7B supervised fine-tuning (AquilaChat-7B's way: instruction data rendered with --prompt-type aquila-chat by
# tools/preprocess_data.py), tp8-pp1 fp16: tune_aquila2_7b_ptd.sh with Aquila-7B's paths (aquila_7b_paths.sh).
#   bash examples/aquila2/tune_aquila_7b_ptd.sh [more aquila_npu.pretrain flags]
# Variables: as tune_aquila2_7b_ptd.sh (PACK=0: ModelLink's padded layout).
set -euo pipefail
source "$(dirname "$0")/aquila_7b_paths.sh"
export DATA_PATH=${DATA_PATH:-"./finetune_dataset/Aquila-7B/alpaca"}
export CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-"./ckpt/Aquila-7B-sft/"}
exec bash "$(dirname "$0")/tune_aquila2_7b_ptd.sh" "$@"
