#!/bin/bash
# A tiny Aquila2-shaped model (aquila2-tiny: 4 layers, hidden 64, GQA) trained on the CPU in about a minute, tp2-pp1
# on 2 processes (gloo): checks the whole training path without an accelerator. On random tokens, or on real data
# when DATA_PATH names it (tools/preprocess_data.py output; TOKENIZER_PATH: its tokenizer, at most 1000 ids).
#   bash examples/aquila2/pretrain_aquila2_tiny_cpu.sh [more aquila_npu.pretrain flags, e.g. --lr 1e-3]
#   DATA_PATH=./dataset/demo_text_document TOKENIZER_PATH=./tok bash examples/aquila2/pretrain_aquila2_tiny_cpu.sh
# Variables: CKPT_SAVE_DIR (default ./ckpt/aquila2-tiny/), TRAIN_ITERS (default 50), NPROC (default 2), TP,
# DATA_PATH and TOKENIZER_PATH (default: random tokens, --mock-data).
set -euo pipefail
source "$(dirname "$0")/launch.sh"  # launch: the pre-flight, then torchrun
if [ -n "${DATA_PATH:-}" ]; then
    DATA_ARGS=(--data-path "$DATA_PATH" --tokenizer-name-or-path "${TOKENIZER_PATH:?TOKENIZER_PATH: the tokenizer of DATA_PATH}")
else
    DATA_ARGS=(--mock-data)
fi
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-"./ckpt/aquila2-tiny/"}
TRAIN_ITERS=${TRAIN_ITERS:-50}
NPROC=${NPROC:-2}
TP=${TP:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

launch --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-6001}" -m aquila_npu.pretrain \
    --device cpu \
    --model aquila2-tiny \
    --tensor-model-parallel-size "$TP" \
    --pipeline-model-parallel-size 1 \
    "${DATA_ARGS[@]}" \
    --seq-length 128 \
    --micro-batch-size 4 \
    --global-batch-size 8 \
    --train-iters "$TRAIN_ITERS" \
    --lr 1e-3 \
    --min-lr 1e-4 \
    --lr-decay-style cosine \
    --lr-warmup-fraction 0.1 \
    --weight-decay 1e-2 \
    --clip-grad 1.0 \
    --save "$CKPT_SAVE_DIR" \
    --save-interval "$TRAIN_ITERS" \
    --log-interval 10 \
    "$@"
