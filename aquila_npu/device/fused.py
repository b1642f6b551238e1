"""The fused-kernel switches users give (ModelLink's ``--use-fused-rmsnorm``, ``--use-flash-attn``, ...), as one frozen
value; ``aquila_npu.device.backends`` turns them into modules. Importing this module imports neither torch nor
megatron-core (the commands build their parsers and check their input before either is imported)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FusedOps:
    """Which fused kernels to use: the ModelLink switches (``SWITCHES``: field -> (flag, help)), which this class also
    adds to a parser (``add_arguments``) and reads back (``from_args``)."""

    rmsnorm: bool = False
    flash_attn: bool = False
    rotary: bool = False
    swiglu: bool = False
    mc2: bool = False

    SWITCHES = {
        "rmsnorm": ("--use-fused-rmsnorm", "fused RMSNorm (npu_rms_norm on Ascend; Transformer Engine on CUDA)"),
        "flash_attn": ("--use-flash-attn", "fused attention (npu_fusion_attention on Ascend; Transformer Engine on "
                                           "CUDA)"),
        "rotary": ("--use-fused-rotary-pos-emb", "fused RoPE (npu_rotary_mul on Ascend; Transformer Engine on "
                                                 "CUDA)"),
        "swiglu": ("--use-fused-swiglu", "fused SwiGLU (npu_swiglu on Ascend; megatron-core's kernel on CUDA)"),
        "mc2": ("--use-mc2", "Ascend MC2: the sequence-parallel all-gather / reduce-scatter of the tensor-parallel "
                             "linears fused into the matmuls (npu_all_gather_base_mm / npu_mm_reduce_scatter_base; "
                             "training with --sequence-parallel at tp 2, 4 or 8, bf16/fp16)"),
    }
    KERNELS = ("rmsnorm", "flash_attn", "rotary", "swiglu")  # the per-layer kernels; mc2 needs sequence parallelism

    @classmethod
    def all(cls) -> "FusedOps":
        """Every fused kernel (not --use-mc2, which only sequence-parallel training can use)."""
        return cls(**{name: True for name in cls.KERNELS})

    @classmethod
    def add_arguments(cls, parser, title: str = "fused kernels (ModelLink switches; need an Ascend NPU, or on CUDA "
                                                 "Transformer Engine)"):
        g = parser.add_argument_group(title)
        for flag, text in cls.SWITCHES.values():
            g.add_argument(flag, action="store_true", help=text)
        return g

    @classmethod
    def from_args(cls, args) -> "FusedOps":
        """From parsed flags (argparse dests, e.g. ``use_fused_rmsnorm``)."""
        return cls(**{name: bool(getattr(args, flag[2:].replace("-", "_"), False))
                      for name, (flag, _) in cls.SWITCHES.items()})

    @classmethod
    def from_names(cls, names) -> "FusedOps":
        return cls(**{name: True for name in names})

    def requested(self):
        """The flags of the switches that are on."""
        return [flag for name, (flag, _) in self.SWITCHES.items() if getattr(self, name)]
