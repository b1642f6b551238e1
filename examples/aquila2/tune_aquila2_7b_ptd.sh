#!/bin/bash
# Aquila2-7B supervised fine-tuning: pretrain_aquila2_7b_ptd.sh on instruction data (tools/preprocess_data.py
# --handler-name GeneralInstructionHandler output), loss on the responses only, starting at iteration 0 from the
# converted (or pretrained) weights: --finetune --is-instruction-dataset.
#   bash examples/aquila2/tune_aquila2_7b_ptd.sh [more aquila_npu.pretrain flags]
# Variables: as pretrain_aquila2_7b_ptd.sh; DATA_PATH defaults to the fine-tuning prefix ModelLink users pass.
set -euo pipefail
export DATA_PATH=${DATA_PATH:-"./finetune_dataset/Aquila2-7B/alpaca"}
export CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-"./ckpt/Aquila2-7B-sft/"}
exec bash "$(dirname "$0")/pretrain_aquila2_7b_ptd.sh" --finetune --is-instruction-dataset "$@"
