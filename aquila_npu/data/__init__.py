"""Data pipeline: ``tools/preprocess_data.py`` (documents -> megatron-core indexed datasets) and the training datasets.

Modules, one job each (importing this package imports none of them):

- ``errors``: ``DataError``, the one exception type for bad input (the CLI turns it into a message and exit code 2).
- ``tokenizer``: load a Hugging Face tokenizer from ``--tokenizer-name-or-path``; the megatron-core tokenizer adapter.
- ``sources``: stream rows from parquet / json / jsonl files (a file, a directory or a glob).
- ``templates``: the alpaca prompt template (ModelLink's) and the AquilaChat2 conversation templates.
- ``handlers``: turn rows into token arrays (pretraining documents, or instruction input_ids / attention_mask / labels).
- ``writer``: write megatron-core ``.bin/.idx`` pairs under temporary names, renamed into place only on success.
- ``preprocess``: the command line (flags, worker processes, progress).
- ``datasets``: for training, megatron-core ``GPTDataset`` splits and an instruction dataset over the packed files.
"""
