#!/bin/bash
# Aquila2-34B LoRA fine-tuning on 8 devices of one node, tp8-pp1 (full fine-tuning needs 16: tune_aquila2_34b_ptd_16p.sh):
# the converted base model frozen (bf16) and adapters (fp32, r 16, alpha 32) on linear_qkv linear_proj linear_fc1
# linear_fc2 (MindSpeed-LLM's --lora-* flags). Checkpoints in CKPT_SAVE_DIR hold the adapters and their optimizer state.
#   bash examples/aquila2/tune_aquila2_34b_lora_ptd.sh [more aquila_npu.pretrain flags]
# Variables: as pretrain_aquila2_34b_ptd_16p.sh (but one node: NNODES=1, CKPT_LOAD_DIR a tp8-pp1 conversion), and
#   LORA_LOAD  an adapter to start from at iteration 0 (an earlier run's, or a Hugging Face PEFT adapter converted
#              with convert_ckpt.py, e.g. from Aquila2's own finetune_lora.sh)
#   RESUME=1   resume the adapter in LORA_LOAD exactly (iteration, optimizer, RNG, data position):
#              LORA_LOAD=$CKPT_SAVE_DIR RESUME=1 bash examples/aquila2/tune_aquila2_34b_lora_ptd.sh
# Packing (PACK=1, the default): whole samples are packed several to a --seq-length sequence (--reset-attention-mask
# --reset-position-ids: the attention never crosses a sample, positions restart at each), so a step computes samples,
# not padding (about 15 Alpaca samples per 2048-token sequence); --global-batch-size then counts packed sequences,
# as the LR schedule and consumed samples do (an epoch takes fewer iterations: see docs/training.md).
# PACK=0: ModelLink's padded layout, one sample per sequence.
set -euo pipefail
PACK_ARGS=()
if [ "${PACK:-1}" = 1 ]; then PACK_ARGS=(--reset-attention-mask --reset-position-ids); fi
export DATA_PATH=${DATA_PATH:-"./finetune_dataset/Aquila2-34B/alpaca"}
export CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-"./model_weights/Aquila2-34B-v0.1-tp8-pp1/"}
export CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-"./ckpt/Aquila2-34B-lora/"}
export NNODES=${NNODES:-1}
LORA_ARGS=(--pipeline-model-parallel-size 1 --global-batch-size 64
           --lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2 --lora-r 16 --lora-alpha 32
           --lr 1.0e-4 --min-lr 1.0e-5)
if [ -n "${LORA_LOAD:-}" ]; then LORA_ARGS+=(--lora-load "$LORA_LOAD"); fi
if [ "${RESUME:-0}" = 1 ]; then export LOAD_ARGS=""; else LORA_ARGS+=(--finetune); fi
exec bash "$(dirname "$0")/pretrain_aquila2_34b_ptd_16p.sh" --is-instruction-dataset ${PACK_ARGS[@]+"${PACK_ARGS[@]}"} "${LORA_ARGS[@]}" "$@"
