#!/bin/bash
# Aquila2-7B LoRA fine-tuning (MindSpeed-LLM's --lora-* flags): tune_aquila2_7b_ptd.sh with the converted base model
# frozen and adapters (fp32, r 16, alpha 32) on linear_qkv linear_proj linear_fc1 linear_fc2, tp8-pp1 on 8 devices.
# Checkpoints in CKPT_SAVE_DIR hold the adapters and their optimizer state only.
#   bash examples/aquila2/tune_aquila2_7b_lora_ptd.sh [more aquila_npu.pretrain flags]
# Variables: as pretrain_aquila2_7b_ptd.sh, and
#   LORA_LOAD  an adapter to start from at iteration 0 (an earlier run's, or a Hugging Face PEFT adapter converted
#              with convert_ckpt.py, e.g. from Aquila2's own finetune_lora.sh)
#   RESUME=1   resume the adapter in LORA_LOAD exactly (iteration, optimizer, RNG, data position):
#              LORA_LOAD=$CKPT_SAVE_DIR RESUME=1 bash examples/aquila2/tune_aquila2_7b_lora_ptd.sh
# Packing (PACK=1, the default): whole samples are packed several to a --seq-length sequence (--reset-attention-mask
# --reset-position-ids: the attention never crosses a sample, positions restart at each), so a step computes samples,
# not padding (about 15 Alpaca samples per 2048-token sequence); --global-batch-size then counts packed sequences,
# as the LR schedule and consumed samples do (an epoch takes fewer iterations: see docs/training.md).
# PACK=0: ModelLink's padded layout, one sample per sequence.
set -euo pipefail
PACK_ARGS=()
if [ "${PACK:-1}" = 1 ]; then PACK_ARGS=(--reset-attention-mask --reset-position-ids); fi
export DATA_PATH=${DATA_PATH:-"./finetune_dataset/Aquila2-7B/alpaca"}
export CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-"./ckpt/Aquila2-7B-lora/"}
LORA_ARGS=(--lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2 --lora-r 16 --lora-alpha 32
           --lr 1.0e-4 --min-lr 1.0e-5)
if [ -n "${LORA_LOAD:-}" ]; then LORA_ARGS+=(--lora-load "$LORA_LOAD"); fi
if [ "${RESUME:-0}" = 1 ]; then export LOAD_ARGS=""; else LORA_ARGS+=(--finetune); fi
exec bash "$(dirname "$0")/pretrain_aquila2_7b_ptd.sh" --is-instruction-dataset ${PACK_ARGS[@]+"${PACK_ARGS[@]}"} "${LORA_ARGS[@]}" "$@"
