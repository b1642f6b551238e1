#!/usr/bin/env python
"""Tokenize parquet / json / jsonl data into megatron-core indexed datasets, with ModelLink's flags.

    # pretraining data: ./dataset/Aquila2-7B/alpaca_text_document.bin/.idx
    python ./tools/preprocess_data.py --input ./dataset/train-00000-of-00001-a09b74b3ef9c3b56.parquet \\
        --tokenizer-name-or-path ./model_from_hf/Aquila2-7B/ --output-prefix ./dataset/Aquila2-7B/alpaca \\
        --workers 4 --log-interval 1000 --tokenizer-type PretrainedFromHF
    # instruction data: ./finetune_dataset/Aquila2-7B/alpaca_packed_{input_ids,attention_mask,labels}_document.*
    python ./tools/preprocess_data.py --input ./finetune_dataset/train-00000-of-00001-a09b74b3ef9c3b56.parquet \\
        --tokenizer-name-or-path ./model_from_hf/Aquila2-7B/ --output-prefix ./finetune_dataset/Aquila2-7B/alpaca \\
        --workers 4 --log-interval 1000 --tokenizer-type PretrainedFromHF \\
        --handler-name GeneralInstructionHandler --append-eod

See docs/data.md and --help.
"""

import sys

from aquila_npu.cli.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
