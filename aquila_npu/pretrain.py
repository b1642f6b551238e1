"""Pretraining and fine-tuning entry point: ``torchrun ... -m aquila_npu.pretrain <Megatron-LM / ModelLink flags>``
(``--help`` lists them). The logic lives in ``aquila_npu.training``."""

import sys

from aquila_npu.training.run import main

if __name__ == "__main__":
    sys.exit(main())
