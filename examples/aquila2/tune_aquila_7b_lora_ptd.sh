#!/bin/bash
# Aquila-7B LoRA fine-tuning, tp8-pp1: tune_aquila2_7b_lora_ptd.sh with Aquila-7B's paths (aquila_7b_paths.sh).
#   bash examples/aquila2/tune_aquila_7b_lora_ptd.sh [more aquila_npu.pretrain flags]
# Variables: as tune_aquila2_7b_lora_ptd.sh (LORA_LOAD, RESUME, PACK).
set -euo pipefail
source "$(dirname "$0")/aquila_7b_paths.sh"
export DATA_PATH=${DATA_PATH:-"./finetune_dataset/Aquila-7B/alpaca"}
export CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-"./ckpt/Aquila-7B-lora/"}
exec bash "$(dirname "$0")/tune_aquila2_7b_lora_ptd.sh" "$@"
