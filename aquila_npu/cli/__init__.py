"""The commands, one thin module each: parse the flags users know from ModelLink / Megatron-LM, call the library,
print. ``common`` holds what they share (``run_cli``: any ``aquila_npu.errors.UserError`` ends as one line and exit
status 2; the device, fused-kernel and architecture argument groups; the inert ModelLink flags).

    module        runs as                                             library
    convert       python tools/checkpoint/convert_ckpt.py, aquila-convert        aquila_npu.checkpoint
    preprocess    python tools/preprocess_data.py, aquila-preprocess              aquila_npu.data
    pretrain      python -m aquila_npu.pretrain, aquila-pretrain                  aquila_npu.training
    generate      python -m aquila_npu.generate, aquila-generate                  aquila_npu.inference
    evaluate      python -m aquila_npu.evaluate, aquila-evaluate                  aquila_npu.evaluation
    benchmark     python -m aquila_npu.benchmark, aquila-benchmark                aquila_npu.benchmarking
    selfcheck     python -m aquila_npu.selfcheck, aquila-selfcheck                aquila_npu.checkpoint, .device
    demo          python -m aquila_npu.demo, aquila-demo                          all of the above, as subprocesses

Importing this package imports neither torch nor megatron-core. It installs one thing, before any command module
imports megatron-core (every entry point, ``python -m``, the console scripts and ``tools/``, comes through here): the
warnings filter that hides exactly megatron-core's "Apex / Transformer Engine not installed" notices
(``aquila_npu.device.notices``); each command's banner names the implementations actually used instead.
"""

from aquila_npu.device.notices import hide_megatron_fallback_notices

hide_megatron_fallback_notices()
