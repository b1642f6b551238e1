# Sourced by the example scripts. launch <torchrun's arguments>: the one-process pre-flight of the launch first
# (python -m aquila_npu.preflight, the same arguments: the command's flags, data, tokenizer, checkpoint and layout for
# the processes the launch starts; a bad input is one line and exit status 2 instead of one line per worker and
# torchrun's failure report), then torchrun. PREFLIGHT=0 skips the pre-flight.
launch() {
    if [ "${PREFLIGHT:-1}" != 0 ]; then
        python -m aquila_npu.preflight "$@" || exit $?
    fi
    torchrun "$@"
}
