# Aquila-7B (FlagAI's first generation: Aquila-7B, AquilaChat-7B, AquilaCode-7B-nv / -ts) has Aquila2-7B's
# architecture (docs/models.md), so its scripts are the Aquila2-7B ones with these paths (ModelLink's Aquila-7B
# layout: tp8-pp1, fp16). Sourced by the *_aquila_7b_*.sh scripts; every value is yours when set before.
# The checkpoint: FlagAI's model folder (config.json + pytorch_model.bin, as FlagAI's AutoLoader reads it) or BAAI's
# Hugging Face release, converted once:
#   python tools/checkpoint/convert_ckpt.py --model-type GPT --loader llama2_hf --saver megatron \
#       --load-dir ./model_from_flagai/aquila-7b/ --save-dir ./model_weights/Aquila-7B-v0.1-tp8-pp1/ \
#       --target-tensor-parallel-size 8 --target-pipeline-parallel-size 1
# The tokenizer: that same folder (its vocab.json + merges.txt are FlagAI's 100k BPE, read without remote code).
export CKPT_LOAD_DIR=${CKPT_LOAD_DIR:-"./model_weights/Aquila-7B-v0.1-tp8-pp1/"}
export TOKENIZER_PATH=${TOKENIZER_PATH:-"./model_from_flagai/aquila-7b/"}
