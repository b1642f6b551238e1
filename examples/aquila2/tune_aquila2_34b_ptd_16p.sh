#!/bin/bash
# Aquila2-34B supervised fine-tuning: pretrain_aquila2_34b_ptd_16p.sh on instruction data (tools/preprocess_data.py
# --handler-name GeneralInstructionHandler output), loss on the responses only, starting at iteration 0 from the
# converted (or pretrained) weights: --finetune --is-instruction-dataset.
#   bash examples/aquila2/tune_aquila2_34b_ptd_16p.sh [more aquila_npu.pretrain flags]
# Variables: as pretrain_aquila2_34b_ptd_16p.sh; DATA_PATH defaults to the fine-tuning prefix ModelLink users pass.
# Packing (PACK=1, the default): whole samples are packed several to a --seq-length sequence (--reset-attention-mask
# --reset-position-ids: the attention never crosses a sample, positions restart at each), so a step computes samples,
# not padding (about 15 Alpaca samples per 2048-token sequence); --global-batch-size then counts packed sequences,
# as the LR schedule and consumed samples do (an epoch takes fewer iterations: see docs/training.md).
# PACK=0: ModelLink's padded layout, one sample per sequence.
set -euo pipefail
PACK_ARGS=()
if [ "${PACK:-1}" = 1 ]; then PACK_ARGS=(--reset-attention-mask --reset-position-ids); fi
export DATA_PATH=${DATA_PATH:-"./finetune_dataset/Aquila2-34B/alpaca"}
export CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-"./ckpt/Aquila2-34B-sft/"}
exec bash "$(dirname "$0")/pretrain_aquila2_34b_ptd_16p.sh" --finetune --is-instruction-dataset ${PACK_ARGS[@]+"${PACK_ARGS[@]}"} "$@"
