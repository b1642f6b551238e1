#!/bin/bash
# Aquila-7B evaluation (TASK=boolq by default), tp8-pp1 on 8 devices (ModelLink's
# examples/aquila/evaluate_aquila_7b_ptd.sh): evaluate_aquila2_7b_ptd.sh with Aquila-7B's paths (aquila_7b_paths.sh).
#   EVAL_DATA_PATH=./boolq/test TASK=boolq bash examples/aquila2/evaluate_aquila_7b_ptd.sh \
#       [more aquila_npu.evaluate flags]
# Variables: as evaluate_aquila2_7b_ptd.sh.
set -euo pipefail
source "$(dirname "$0")/aquila_7b_paths.sh"
exec bash "$(dirname "$0")/evaluate_aquila2_7b_ptd.sh" "$@"
