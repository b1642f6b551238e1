"""``python -m aquila_npu.evaluate``: the command lives in ``aquila_npu.cli.evaluate`` (``--help``: its flags)."""

import sys

from aquila_npu.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
