#!/bin/bash
# Aquila2-7B text generation, tp8-pp1 on 8 devices (ModelLink's examples/aquila2/generate_aquila2_7b_ptd.sh).
#   CKPT_LOAD_DIR=... TOKENIZER_PATH=... bash examples/aquila2/generate_aquila2_7b_ptd.sh [more aquila_npu.generate flags]
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
CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-"./model_weights/Aquila2-7B-v0.1-tp8-pp1/"}
TOKENIZER_PATH=${TOKENIZER_PATH:-"./model_from_hf/Aquila2-7B/"}

TP=${TP:-8}
PP=${PP:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
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
    --load "$CKPT_LOAD_DIR" \
    --tokenizer-type PretrainedFromHF \
    --tokenizer-name-or-path "$TOKENIZER_PATH" \
    --tokenizer-not-use-fast \
    --exit-on-missing-checkpoint \
    --no-load-optim \
    --no-load-rng \
    --fp16 \
    --micro-batch-size 1 \
    --max-new-tokens "$MAX_NEW_TOKENS" \
    ${FUSED_ARGS[@]+"${FUSED_ARGS[@]}"} \
    ${PROMPT_ARGS[@]+"${PROMPT_ARGS[@]}"} \
    ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} \
    "$@"
