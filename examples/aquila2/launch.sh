# Sourced by the example scripts. launch <torchrun's arguments>: the one-process pre-flight of the launch first
# (python -m aquila_npu.preflight, the same arguments: the command's flags, data, tokenizer, checkpoint and layout for
# the processes the launch starts; a bad input is one line and exit status 2 instead of one line per worker and
# torchrun's failure report), then torchrun. PREFLIGHT=0 skips the pre-flight.

# The Ascend runtime settings (each with its source and reason: aquila_npu/device/npu_runtime.py, which sets the same
# values when a command starts on an NPU). Yours win: export any of them before running a script.
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-3600}    # s for every rank to reach a communicator (CANN: 120)
export HCCL_EXEC_TIMEOUT=${HCCL_EXEC_TIMEOUT:-1800}          # s a collective waits, = torch.distributed's 30 min
export PYTORCH_NPU_ALLOC_CONF=${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}  # ModelLink's / MindSpeed-LLM's
export CPU_AFFINITY_CONF=${CPU_AFFINITY_CONF:-1}            # threads bound to the cores beside each NPU
export AQUILA_NPU_JIT_COMPILE=${AQUILA_NPU_JIT_COMPILE:-0}  # 0: CANN's binary kernels (no compiling at step 1)
# Two jobs on one node: give the second its own HCCL port base, e.g. HCCL_IF_BASE_PORT=61000 bash <script>

launch() {
    if [ "${PREFLIGHT:-1}" != 0 ]; then
        python -m aquila_npu.preflight "$@" || exit $?
    fi
    torchrun "$@"
}
