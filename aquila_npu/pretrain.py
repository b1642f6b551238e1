"""``python -m aquila_npu.pretrain``: the command lives in ``aquila_npu.cli.pretrain`` (``--help``: its flags)."""

import sys

from aquila_npu.cli.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
