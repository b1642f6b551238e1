#!/bin/bash
# Aquila2-7B BoolQ evaluation, tp8-pp1 on 8 devices (ModelLink's examples/aquila2/evaluate_aquila2_7b_ptd.sh).
#   CKPT_LOAD_DIR=... TOKENIZER_PATH=... bash examples/aquila2/evaluate_aquila2_7b_ptd.sh [more aquila_npu.evaluate flags]
# Scoring: ModelLink's (first-token Yes/No logits, behind the published BoolQ 77.8% (7B) / 88.0% (34B)); SCORING=loglikelihood
# gives lm-evaluation-harness's. Data: BoolQ dev.jsonl (https://github.com/google-research-datasets/boolean-questions)
# saved e.g. as ./boolq/test/dev.jsonl.
# Variables (environment, with defaults): CKPT_LOAD_DIR, TOKENIZER_PATH, EVAL_DATA_PATH, TASK, SCORING, MICRO_BATCH_SIZE,
# OUTPUT (json), TP, PP, GPUS_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT.
set -euo pipefail

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
EVAL_DATA_PATH=${EVAL_DATA_PATH:-"./boolq/test"}
TASK=${TASK:-"boolq"}
SCORING=${SCORING:-"first-token"}

TP=${TP:-8}
PP=${PP:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-8}

DISTRIBUTED_ARGS=(--nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK"
                  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")

EXTRA_ARGS=()
if [ -n "${OUTPUT:-}" ]; then EXTRA_ARGS+=(--output "$OUTPUT"); fi

torchrun "${DISTRIBUTED_ARGS[@]}" -m aquila_npu.evaluate \
    --task "$TASK" \
    --task-data-path "$EVAL_DATA_PATH" \
    --scoring "$SCORING" \
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
    --micro-batch-size "$MICRO_BATCH_SIZE" \
    --max-new-tokens 1 \
    ${FUSED_ARGS[@]+"${FUSED_ARGS[@]}"} \
    ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} \
    "$@"
