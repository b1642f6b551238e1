#!/bin/bash
# Aquila2-34B text generation, tp8-pp2 on 16 devices (2 nodes x 8) (ModelLink's examples/aquila2/generate_aquila2_34b_ptd.sh).
#   CKPT_LOAD_DIR=... TOKENIZER_PATH=... bash examples/aquila2/generate_aquila2_34b_ptd.sh [more aquila_npu.generate flags]
# Each node runs this with its own NODE_RANK (0, 1) and the same MASTER_ADDR; one 16-device node: GPUS_PER_NODE=16
# NNODES=1. ModelLink's README also loads a tp8-pp1 conversion on one 8-device node: PP=1 GPUS_PER_NODE=8 NNODES=1.
# Variables (environment, with defaults): CKPT_LOAD_DIR, TOKENIZER_PATH, PROMPT or PROMPTS_FILE, MAX_NEW_TOKENS,
# CHAT=1 (AquilaChat2 template), OUTPUT (jsonl), TP, PP, GPUS_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT.
set -euo pipefail
source "$(dirname "$0")/launch.sh"  # launch: the pre-flight, then torchrun

# Ascend CANN environment, only where it is installed (edit the path for your machine).
CANN_SET_ENV=${CANN_SET_ENV:-/usr/local/Ascend/ascend-toolkit/set_env.sh}
FUSED_ARGS=()
if [ -f "$CANN_SET_ENV" ]; then
    set +u; source "$CANN_SET_ENV"; set -u
    FUSED_ARGS=(--use-fused-rmsnorm)
fi
export CUDA_DEVICE_MAX_CONNECTIONS=1

# please fill these path configurations
CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-"./model_weights/Aquila2-34B-v0.1-tp8-pp2/"}
TOKENIZER_PATH=${TOKENIZER_PATH:-"./model_from_hf/Aquila2-34B/"}

TP=${TP:-8}
PP=${PP:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-2}
NODE_RANK=${NODE_RANK:-0}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-512}

DISTRIBUTED_ARGS=(--nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK"
                  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")

if [ -n "${PROMPTS_FILE:-}" ]; then
    PROMPT_ARGS=(--prompts-file "$PROMPTS_FILE")
else
    PROMPT_ARGS=(--prompt "${PROMPT:-Please introduce Beijing, the capital of China.}")
fi
EXTRA_ARGS=()
if [ -n "${CHAT:-}" ]; then EXTRA_ARGS+=(--chat); fi
if [ -n "${OUTPUT:-}" ]; then EXTRA_ARGS+=(--output "$OUTPUT"); fi

launch "${DISTRIBUTED_ARGS[@]}" -m aquila_npu.generate \
    --tensor-model-parallel-size "$TP" \
    --pipeline-model-parallel-size "$PP" \
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
    --load "$CKPT_LOAD_DIR" \
    --tokenizer-type PretrainedFromHF \
    --tokenizer-name-or-path "$TOKENIZER_PATH" \
    --tokenizer-not-use-fast \
    --exit-on-missing-checkpoint \
    --no-load-optim \
    --no-load-rng \
    --bf16 \
    --micro-batch-size 1 \
    --max-new-tokens "$MAX_NEW_TOKENS" \
    ${FUSED_ARGS[@]+"${FUSED_ARGS[@]}"} \
    ${PROMPT_ARGS[@]+"${PROMPT_ARGS[@]}"} \
    ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} \
    "$@"
