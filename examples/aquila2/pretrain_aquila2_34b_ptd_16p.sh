#!/bin/bash
# Aquila2-34B pretraining, tp8-pp2 on 16 devices, 2 nodes x 8 (ModelLink's pretrain_aquila2_34b_ptd_16p.sh).
#   on each node: MASTER_ADDR=<node 0 address> NODE_RANK=<0 or 1> bash examples/aquila2/pretrain_aquila2_34b_ptd_16p.sh [more aquila_npu.pretrain flags]
# Fine-tuning (SFT) is the same run plus --finetune --is-instruction-dataset: tune_aquila2_34b_ptd_16p.sh.
# Variables (environment, with defaults): CKPT_LOAD_DIR, CKPT_SAVE_DIR, DATA_PATH, TOKENIZER_PATH, TRAIN_ITERS,
# GPUS_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, LOAD_ARGS.
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
CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-"./model_weights/Aquila2-34B-v0.1-tp8-pp2/"}
CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-"./ckpt/Aquila2-34B/"}
DATA_PATH=${DATA_PATH:-"./dataset/Aquila2-34B/alpaca_text_document"}
TOKENIZER_PATH=${TOKENIZER_PATH:-"./model_from_hf/Aquila2-34B/"}

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-2}
NODE_RANK=${NODE_RANK:-0}
TRAIN_ITERS=${TRAIN_ITERS:-2000}
# What --load restores besides the weights (ModelLink's scripts: nothing); LOAD_ARGS= (empty) loads everything
LOAD_ARGS=${LOAD_ARGS-"--no-load-optim --no-load-rng"}

DISTRIBUTED_ARGS=(--nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK"
                  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")

launch "${DISTRIBUTED_ARGS[@]}" -m aquila_npu.pretrain \
    --tensor-model-parallel-size 8 \
    --pipeline-model-parallel-size 2 \
    --sequence-parallel \
    --num-layers 60 \
    --hidden-size 6144 \
    --ffn-hidden-size 24576 \
    --num-attention-heads 48 \
    --group-query-attention \
    --num-query-groups 8 \
    --seq-length 4096 \
    --max-position-embeddings 4096 \
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
    --micro-batch-size 2 \
    --global-batch-size 1024 \
    --train-iters "$TRAIN_ITERS" \
    --lr 8.0e-8 \
    --min-lr 1.0e-8 \
    --lr-decay-style cosine \
    --lr-warmup-fraction 0.01 \
    --weight-decay 1e-2 \
    --clip-grad 1.0 \
    --adam-beta1 0.9 \
    --adam-beta2 0.95 \
    --bf16 \
    --initial-loss-scale 524288.0 \
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
