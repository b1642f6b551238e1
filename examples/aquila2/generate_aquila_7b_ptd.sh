#!/bin/bash
# Aquila-7B text generation, tp8-pp1 on 8 devices (ModelLink's examples/aquila/generate_aquila_7b_ptd.sh):
# generate_aquila2_7b_ptd.sh with Aquila-7B's paths (aquila_7b_paths.sh). CHAT=1 with an AquilaChat-7B checkpoint
# uses FlagAI's aquila-chat template (the converter records it from the folder's name, aquilachat-7b).
#   bash examples/aquila2/generate_aquila_7b_ptd.sh [more aquila_npu.generate flags]
# Variables: as generate_aquila2_7b_ptd.sh.
set -euo pipefail
source "$(dirname "$0")/aquila_7b_paths.sh"
exec bash "$(dirname "$0")/generate_aquila2_7b_ptd.sh" "$@"
