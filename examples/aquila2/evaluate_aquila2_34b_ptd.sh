#!/bin/bash
# Aquila2-34B evaluation, tp8-pp2 on 16 devices (2 nodes x 8) (as ModelLink's evaluate_aquila2_34b_ptd.sh).
# TASK= one of boolq (default) mmlu ceval cmmlu gsm8k bbh agieval human_eval, or several comma-separated (then
# EVAL_DATA_PATH comma-separated in the same order).
#   CKPT_LOAD_DIR=... TOKENIZER_PATH=... bash examples/aquila2/evaluate_aquila2_34b_ptd.sh [more aquila_npu.evaluate flags]
# Each node runs this with its own NODE_RANK (0, 1) and the same MASTER_ADDR; one 16-device node: GPUS_PER_NODE=16
# NNODES=1. ModelLink's README also loads a tp8-pp1 conversion on one 8-device node: PP=1 GPUS_PER_NODE=8 NNODES=1.
# Scoring: ModelLink's by default (SCORING=modellink; for BoolQ its first-token Yes/No logits, behind the published
# BoolQ 77.8% (7B) / 88.0% (34B)); SCORING=lm-eval gives lm-evaluation-harness's (for BoolQ also called loglikelihood).
# Data (EVAL_DATA_PATH, ModelLink's layouts; see docs/inference.md): boolq ./boolq/test (dev.jsonl), mmlu ./mmlu/test
# (with ./mmlu/dev), ceval ./ceval/val (with ./ceval/dev), cmmlu ./cmmlu/test (with ./cmmlu/dev), gsm8k ./gsm8k
# (test.jsonl, train.jsonl), bbh ./bbh, agieval ./agieval, human_eval: empty = the human-eval package's problems.
# MAX_NEW_TOKENS: unset = each task's default (ModelLink's recommended values: mmlu/ceval/cmmlu 2, gsm8k 512, bbh 32,
# agieval 3, human_eval 1024; lm-eval scoring: the task's own).
# Variables (environment, with defaults): CKPT_LOAD_DIR, TOKENIZER_PATH, EVAL_DATA_PATH, TASK, SCORING, MAX_NEW_TOKENS,
# EVAL_BATCH_SIZE, MICRO_BATCH_SIZE, OUTPUT (json), TP, PP, GPUS_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT.
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
TASK=${TASK:-"boolq"}
case "$TASK" in
    boolq) DEFAULT_DATA="./boolq/test" ;; mmlu) DEFAULT_DATA="./mmlu/test" ;; ceval) DEFAULT_DATA="./ceval/val" ;;
    cmmlu) DEFAULT_DATA="./cmmlu/test" ;; gsm8k) DEFAULT_DATA="./gsm8k" ;; bbh) DEFAULT_DATA="./bbh" ;;
    agieval) DEFAULT_DATA="./agieval" ;; *) DEFAULT_DATA="" ;;  # human_eval: the human-eval package's problems
esac
EVAL_DATA_PATH=${EVAL_DATA_PATH-$DEFAULT_DATA}
if [ "$TASK" = "boolq" ]; then SCORING=${SCORING:-"first-token"}; else SCORING=${SCORING:-"modellink"}; fi

TP=${TP:-8}
PP=${PP:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-2}
NODE_RANK=${NODE_RANK:-0}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-8}

DISTRIBUTED_ARGS=(--nproc_per_node "$GPUS_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK"
                  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")

EXTRA_ARGS=()
if [ -n "${OUTPUT:-}" ]; then EXTRA_ARGS+=(--output "$OUTPUT"); fi
if [ -n "$EVAL_DATA_PATH" ]; then EXTRA_ARGS+=(--task-data-path "$EVAL_DATA_PATH"); fi
if [ -n "${MAX_NEW_TOKENS:-}" ]; then EXTRA_ARGS+=(--max-new-tokens "$MAX_NEW_TOKENS");
elif [ "$TASK" = "boolq" ]; then EXTRA_ARGS+=(--max-new-tokens 1); fi  # as ModelLink's script (first-token scoring)
if [ -n "${EVAL_BATCH_SIZE:-}" ]; then EXTRA_ARGS+=(--evaluation-batch-size "$EVAL_BATCH_SIZE"); fi

launch "${DISTRIBUTED_ARGS[@]}" -m aquila_npu.evaluate \
    --task "$TASK" \
    --scoring "$SCORING" \
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
    --micro-batch-size "$MICRO_BATCH_SIZE" \
    ${FUSED_ARGS[@]+"${FUSED_ARGS[@]}"} \
    ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} \
    "$@"
