#!/bin/bash
# A tiny Aquila2-shaped model (aquila2-tiny: 4 layers, hidden 64, GQA) trained on the CPU in about a minute, on
# random tokens, tp2-pp1 on 2 processes (gloo): checks the whole training path without an accelerator.
#   bash examples/aquila2/pretrain_aquila2_tiny_cpu.sh [more aquila_npu.pretrain flags, e.g. --data-path ...]
# Variables: CKPT_SAVE_DIR (default ./ckpt/aquila2-tiny/), TRAIN_ITERS (default 50), NPROC (default 2), TP.
set -euo pipefail
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-"./ckpt/aquila2-tiny/"}
TRAIN_ITERS=${TRAIN_ITERS:-50}
NPROC=${NPROC:-2}
TP=${TP:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

torchrun --nproc_per_node "$NPROC" --master_port "${MASTER_PORT:-6001}" -m aquila_npu.pretrain \
    --device cpu \
    --model aquila2-tiny \
    --tensor-model-parallel-size "$TP" \
    --pipeline-model-parallel-size 1 \
    --mock-data \
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
