"""``python -m aquila_npu.demo``: the command lives in ``aquila_npu.cli.demo`` (``--help``: its flags)."""

import sys

from aquila_npu.cli.demo import main

if __name__ == "__main__":
    sys.exit(main())
