"""The training-step switches a stock torch allows (issue 28), beside the fused-kernel switches of
``aquila_npu.device.fused``: the flags ``aquila_npu.pretrain`` and the benchmark take, as one frozen value, and the
step profile's flags. Importing this module imports neither torch nor megatron-core (the commands check their flags
before either is imported).

* ``--loss-chunk-size N``: the output layer and the cross-entropy over the vocabulary computed N tokens at a time
  (``aquila_npu.models.chunked_loss``): no fp32 logits of the whole micro-batch are ever materialised (megatron-core's
  loss holds [s, b, V] logits in the training dtype and their fp32 softmax). Real on every device (plain matmuls).
* ``--compile-elementwise``: ``torch.compile`` of the elementwise regions: our RMSNorm, megatron-core's own
  jit-fused SwiGLU (``bias_activation_fusion``) and residual add (``bias_dropout_fusion``), which are
  ``torch.compile``'d functions (``megatron.core.jit.jit_fuser``). cuda and cpu (inductor's C++ backend needs a C++
  compiler); refused on npu, whose fused kernels are the ModelLink switches.
* ``--no-step-syncs``: a step that never waits for the device on the host (``aquila_npu.training.no_syncs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from aquila_npu.errors import UsageError

COMPILE_ON_NPU = ("--compile-elementwise: torch.compile has no Ascend backend in a stock torch / torch_npu (it "
                  "compiles for CUDA); on npu use the fused kernels instead (--use-fused-rmsnorm --use-fused-swiglu "
                  "--use-fused-rotary-pos-emb)")


@dataclass(frozen=True)
class StepSwitches:
    loss_chunk_size: int = 0  # tokens per chunk of the output layer + cross-entropy; 0: megatron-core's loss
    compile_elementwise: bool = False
    no_step_syncs: bool = False

    @classmethod
    def add_arguments(cls, parser):
        g = parser.add_argument_group("training-step switches (stock torch; docs/benchmark.md)")
        g.add_argument("--loss-chunk-size", type=int, default=0, metavar="TOKENS",
                       help="compute the output layer and the cross-entropy TOKENS tokens at a time, never holding "
                            "the fp32 logits of the whole micro-batch (default 0: megatron-core's loss)")
        g.add_argument("--compile-elementwise", action="store_true",
                       help="torch.compile the elementwise regions (RMSNorm; megatron-core's fused SwiGLU and "
                            "residual add); cuda and cpu only")
        g.add_argument("--no-step-syncs", action="store_true",
                       help="a step that never waits for the device: the token count, gradient norm and clipping "
                            "stay on the device, the loss is read after the step (not with --fp16)")
        g.add_argument("--profile-breakdown", default=None, metavar="FILE",
                       help="profile one training iteration with torch.profiler and write where its time goes "
                            "(GEMMs, attention, elementwise, output layer + cross-entropy, optimizer, host gaps) to "
                            "FILE as JSON; cuda and cpu")
        g.add_argument("--profile-step", type=int, default=None, metavar="N",
                       help="the iteration --profile-breakdown profiles (default 2: after the first)")
        return g

    @classmethod
    def from_args(cls, args) -> "StepSwitches":
        return cls(loss_chunk_size=getattr(args, "loss_chunk_size", 0) or 0,
                   compile_elementwise=bool(getattr(args, "compile_elementwise", False)),
                   no_step_syncs=bool(getattr(args, "no_step_syncs", False)))

    def requested(self) -> List[str]:
        """The flags of the switches that are on."""
        return ([f"--loss-chunk-size={self.loss_chunk_size}"] if self.loss_chunk_size else []) + \
               (["--compile-elementwise"] if self.compile_elementwise else []) + \
               (["--no-step-syncs"] if self.no_step_syncs else [])


def validate(args) -> None:
    """The flag checks that need no device (``aquila_npu.cli.pretrain``)."""
    if getattr(args, "loss_chunk_size", 0) < 0:
        raise UsageError(f"--loss-chunk-size {args.loss_chunk_size} must be >= 0 (0: off)")
    if getattr(args, "no_step_syncs", False) and getattr(args, "fp16", False):
        raise UsageError("--no-step-syncs and --fp16 exclude each other: the fp16 loss scaler reads its found-inf "
                         "flag on the host every step (use --bf16)")
    if getattr(args, "profile_step", None) is not None:
        if args.profile_step < 1:
            raise UsageError(f"--profile-step {args.profile_step} must be >= 1")
        if not args.profile_breakdown:
            raise UsageError("--profile-step needs --profile-breakdown FILE (where the profile goes)")


def check_device(switches: StepSwitches, device: str, profile: bool = False) -> None:
    """One line for what the resolved device cannot do."""
    if device == "npu" and switches.compile_elementwise:
        raise UsageError(COMPILE_ON_NPU)
    if device == "npu" and profile:
        raise UsageError("--profile-breakdown: torch.profiler does not see NPU kernels (torch_npu.profiler does; not "
                         "wired in): profile on cuda or cpu")
