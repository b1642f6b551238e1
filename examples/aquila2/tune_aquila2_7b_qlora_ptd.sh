#!/bin/bash
# Aquila2-7B QLoRA fine-tuning (MindSpeed-LLM's --qlora; the quantisation of Aquila2's finetune_qlora.sh: NF4, double
# quantisation, bf16 compute): tune_aquila2_7b_lora_ptd.sh (adapters r 16, alpha 32 on linear_qkv linear_proj
# linear_fc1 linear_fc2, tp8-pp1 on 8 devices, packing) on a 4-bit base, in bf16. Checkpoints hold the adapters only.
#   bash examples/aquila2/tune_aquila2_7b_qlora_ptd.sh [more aquila_npu.pretrain flags]
# The base is quantised once, by the converter (each Hugging Face linear by bitsandbytes, then cut into tp8 shards):
#   python tools/checkpoint/convert_ckpt.py --model-type GPT --loader llama2_hf --saver megatron \
#       --load-dir ./model_from_hf/Aquila2-7B/ --save-dir ./model_weights/Aquila2-7B-v0.1-tp8-pp1-nf4/ \
#       --target-tensor-parallel-size 8 --target-pipeline-parallel-size 1 --params-dtype bf16 --qlora-nf4
# Variables: as tune_aquila2_7b_lora_ptd.sh (LORA_LOAD, RESUME=1, PACK=0, ...); CKPT_LOAD_DIR is the NF4 base.
# Launched by tune_aquila2_7b_lora_ptd.sh -> pretrain_aquila2_7b_ptd.sh,
# which sources launch.sh (the pre-flight, then torchrun; the Ascend runtime settings).
set -euo pipefail
export CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-"./model_weights/Aquila2-7B-v0.1-tp8-pp1-nf4/"}
export CKPT_SAVE_DIR=${CKPT_SAVE_DIR:-"./ckpt/Aquila2-7B-qlora/"}
export DTYPE_ARGS=${DTYPE_ARGS-"--bf16"}
exec bash "$(dirname "$0")/tune_aquila2_7b_lora_ptd.sh" --qlora "$@"
