"""``python -m aquila_npu.selfcheck``: the command lives in ``aquila_npu.cli.selfcheck`` (``--help``: its flags)."""

import sys

from aquila_npu.cli.selfcheck import main

if __name__ == "__main__":
    sys.exit(main())
