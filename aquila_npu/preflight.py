"""``python -m aquila_npu.preflight``: the command lives in ``aquila_npu.cli.preflight`` (``--help``: its usage)."""

import sys

from aquila_npu.cli.preflight import main

if __name__ == "__main__":
    sys.exit(main())
