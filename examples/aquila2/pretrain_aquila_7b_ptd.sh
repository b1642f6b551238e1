#!/bin/bash
# Aquila-7B pretraining, tp8-pp1 fp16 on 8 devices of one node (ModelLink's examples/aquila/pretrain_aquila_7b_ptd.sh):
# pretrain_aquila2_7b_ptd.sh with Aquila-7B's paths (aquila_7b_paths.sh).
#   bash examples/aquila2/pretrain_aquila_7b_ptd.sh [more aquila_npu.pretrain flags]
# Variables: as pretrain_aquila2_7b_ptd.sh.
set -euo pipefail
source "$(dirname "$0")/aquila_7b_paths.sh"
export DATA_PATH=${DATA_PATH:-"./dataset/Aquila-7B/alpaca_text_document"}
export CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-"./ckpt/Aquila-7B/"}
exec bash "$(dirname "$0")/pretrain_aquila2_7b_ptd.sh" "$@"
