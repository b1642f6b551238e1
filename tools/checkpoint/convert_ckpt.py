#!/usr/bin/env python
"""Convert Aquila2 checkpoints: Hugging Face <-> Megatron (any tensor/pipeline layout), with ModelLink's flags.

    # HF -> Megatron tp8-pp1
    python tools/checkpoint/convert_ckpt.py --model-type GPT --loader llama2_hf --saver megatron \\
        --load-dir ./model_from_hf/Aquila2-7B/ --save-dir ./model_weights/Aquila2-7B-v0.1-tp8-pp1/ \\
        --target-tensor-parallel-size 8 --target-pipeline-parallel-size 1 \\
        --tokenizer-model ./model_from_hf/Aquila2-7B/tokenizer.json
    # Megatron (any layout) -> HF, written to <save-dir>/mg2hg/
    python tools/checkpoint/convert_ckpt.py --model-type GPT --loader megatron --saver megatron \\
        --save-model-type save_huggingface_llama --load-dir ./model_weights/Aquila2-7B-v0.1-tp8-pp1/ \\
        --target-tensor-parallel-size 1 --target-pipeline-parallel-size 1 --save-dir ./model_from_hf/Aquila2-7B/
"""

import sys

from aquila_npu.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
