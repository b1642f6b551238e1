"""The names ``--fused-switches`` takes (``rmsnorm``, ``flash-attn``, ...) for the fused-kernel switches of
``aquila_npu.device.fused.FusedOps``, derived from its table. Importing this module imports neither torch nor
megatron-core."""

from aquila_npu.device.fused import FusedOps

SWITCHES = {name.replace("_", "-"): name for name in FusedOps.SWITCHES}  # --fused-switches names -> FusedOps fields
