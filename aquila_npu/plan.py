"""``python -m aquila_npu.plan``: the command lives in ``aquila_npu.cli.plan`` (``--help``: its flags)."""

import sys

from aquila_npu.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
