#!/bin/bash
# Aquila2-7B pretraining, tp8-pp1 on 8 devices of one node (ModelLink's examples/aquila2/pretrain_aquila2_7b_ptd.sh).
#   bash examples/aquila2/pretrain_aquila2_7b_ptd.sh [more aquila_npu.pretrain flags]
# Fine-tuning (SFT) is the same run plus --finetune --is-instruction-dataset: tune_aquila2_7b_ptd.sh.
# Variables (environment, with defaults): CKPT_LOAD_DIR, CKPT_SAVE_DIR, DATA_PATH, TOKENIZER_PATH, TRAIN_ITERS,
# GPUS_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, LOAD_ARGS, DTYPE_ARGS.
set -euo pipefail
source "$(dirname "$0")/launch.sh"  # launch: the pre-flight, then torchrun

# Ascend CANN environment, only where it is installed (edit the path for your machine); the fused Ascend kernels
# are switched on there.
CANN_SET_ENV=${CANN_SET_ENV:-/usr/local/Ascend/ascend-toolkit/set_env.sh}
FUSED_ARGS=()
if [ -f "$CANN_SET_ENV" ]; then
    set +u; source "$CANN_SET_ENV"; set -u
    FUSED_ARGS=(--use-flash-attn --use-fused-rmsnorm --use-fused-rotary-pos-emb --use-fused-swiglu)
fi
export CUDA_DEVICE_MAX_CONNECTIONS=1

# please fill these path configurations
CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-"./model_weights/Aquila2-7B-v0.1-tp8-pp1/"}
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-"./ckpt/Aquila2-7B/"}
DATA_PATH=${DATA_PATH:-"./dataset/Aquila2-7B/alpaca_text_document"}
TOKENIZER_PATH=${TOKENIZER_PATH:-"./model_from_hf/Aquila2-7B/"}

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
TRAIN_ITERS=${TRAIN_ITERS:-2000}
# What --load restores besides the weights (ModelLink's scripts: nothing); LOAD_ARGS= (empty) loads everything
LOAD_ARGS=${LOAD_ARGS-"--no-load-optim --no-load-rng"}
# The training dtype (ModelLink's 7B scripts: fp16 with loss scaling; the QLoRA script: --bf16)
DTYPE_ARGS=${DTYPE_ARGS-"--fp16 --initial-loss-scale 65536"}

DISTRIBUTED_ARGS=(--nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK"
                  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")

launch "${DISTRIBUTED_ARGS[@]}" -m aquila_npu.pretrain \
    --tensor-model-parallel-size 8 \
    --pipeline-model-parallel-size 1 \
    --sequence-parallel \
    --num-layers 32 \
    --hidden-size 4096 \
    --ffn-hidden-size 11008 \
    --num-attention-heads 32 \
    --seq-length 2048 \
    --max-position-embeddings 2048 \
    --position-embedding-type rope \
    --normalization RMSNorm \
    --norm-epsilon 1e-5 \
    --swiglu \
    --untie-embeddings-and-output-weights \
    --disable-bias-linear \
    --make-vocab-size-divisible-by 1 \
    --attention-softmax-in-fp32 \
    --no-masked-softmax-fusion \
    --no-gradient-accumulation-fusion \
    --init-method-std 0.01 \
    --attention-dropout 0.0 \
    --hidden-dropout 0.0 \
    --micro-batch-size 8 \
    --global-batch-size 64 \
    --train-iters "$TRAIN_ITERS" \
    --lr 1.0e-7 \
    --min-lr 1.0e-8 \
    --lr-decay-style cosine \
    --lr-warmup-fraction 0.01 \
    --weight-decay 1e-1 \
    --clip-grad 1.0 \
    --adam-beta1 0.9 \
    --adam-beta2 0.95 \
    $DTYPE_ARGS \
    --tokenizer-type PretrainedFromHF \
    --tokenizer-name-or-path "$TOKENIZER_PATH" \
    --data-path "$DATA_PATH" \
    --split 100,0,0 \
    --load "$CKPT_LOAD_DIR" \
    --save "$CKPT_SAVE_DIR" \
    $LOAD_ARGS \
    --log-interval 1 \
    --save-interval 1000 \
    --eval-interval 1000 \
    --eval-iters 0 \
    ${FUSED_ARGS[@]+"${FUSED_ARGS[@]}"} \
    "$@"
