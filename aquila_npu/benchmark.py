"""``python -m aquila_npu.benchmark``: the command lives in ``aquila_npu.cli.benchmark`` (``--help``: its flags)."""

import sys

from aquila_npu.cli.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
