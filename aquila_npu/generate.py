"""``python -m aquila_npu.generate``: the command lives in ``aquila_npu.cli.generate`` (``--help``: its flags)."""

import sys

from aquila_npu.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
