#!/bin/bash
# Aquila2-34B supervised fine-tuning: pretrain_aquila2_34b_ptd_16p.sh on instruction data (tools/preprocess_data.py
# --handler-name GeneralInstructionHandler output), loss on the responses only, starting at iteration 0 from the
# converted (or pretrained) weights: --finetune --is-instruction-dataset.
#   bash examples/aquila2/tune_aquila2_34b_ptd_16p.sh [more aquila_npu.pretrain flags]
# Variables: as pretrain_aquila2_34b_ptd_16p.sh; DATA_PATH defaults to the fine-tuning prefix ModelLink users pass.
set -euo pipefail
export DATA_PATH=${DATA_PATH:-"./finetune_dataset/Aquila2-34B/alpaca"}
export CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-"./ckpt/Aquila2-34B-sft/"}
exec bash "$(dirname "$0")/pretrain_aquila2_34b_ptd_16p.sh" --finetune --is-instruction-dataset "$@"
