"""Command-line flags of ``aquila_npu.pretrain``: the Megatron-LM / ModelLink names users already pass."""

from __future__ import annotations

import argparse
from typing import List, Optional

from aquila_npu.device.backends import FusedOps
from aquila_npu.errors import UsageError


def _model(p):
    g = p.add_argument_group("model (filled from --model, or from the --load checkpoint, when not given)")
    g.add_argument("--model", default=None,
                   help="a registry name (aquila2-7b, aquila2-34b, aquila2-tiny, ...: python -m aquila_npu.models) "
                        "that fills the architecture flags below")
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--ffn-hidden-size", type=int)
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--group-query-attention", action="store_true", help="use --num-query-groups key/value heads")
    g.add_argument("--num-query-groups", type=int, help="key/value heads with --group-query-attention")
    g.add_argument("--seq-length", type=int, help="training sequence length")
    g.add_argument("--max-position-embeddings", type=int)
    g.add_argument("--vocab-size", type=int,
                   help="vocabulary size (unpadded) of a model built from the flags; default: the tokenizer's "
                        "(needed with --mock-data and no tokenizer, as the benchmark does)")
    g.add_argument("--position-embedding-type", default="rope", choices=["rope"])
    g.add_argument("--rotary-base", type=float, help="RoPE theta (default 10000)")
    g.add_argument("--normalization", default="RMSNorm", choices=["RMSNorm"])
    g.add_argument("--norm-epsilon", type=float)
    g.add_argument("--swiglu", action="store_true", help="SwiGLU MLP (Aquila2 always uses it)")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="separate output layer (Aquila2 always has one)")
    g.add_argument("--disable-bias-linear", action="store_true", help="no linear biases (Aquila2 has none)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=None,
                   help="pad the vocabulary to a multiple of this x tp (default 1, as ModelLink's Aquila2 scripts; "
                        "a checkpoint's own value when loading one)")
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--attention-softmax-in-fp32", action="store_true", help="accepted; always on")
    g.add_argument("--no-masked-softmax-fusion", action="store_true", help="accepted; the backend picks kernels")
    g.add_argument("--no-gradient-accumulation-fusion", action="store_true", help="accepted; always off")


def _parallel(p):
    g = p.add_argument_group("parallelism and device")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true", help="megatron-core sequence parallelism (tp > 1)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard optimizer state across data-parallel ranks (megatron-core DistributedOptimizer)")
    g.add_argument("--device", default="auto", help="auto (default: npu, else cuda, else cpu), npu, cuda or cpu")
    g.add_argument("--use-flash-attn", action="store_true", help="fused attention (npu_fusion_attention on Ascend)")
    g.add_argument("--use-fused-rmsnorm", action="store_true", help="fused RMSNorm (npu_rms_norm)")
    g.add_argument("--use-fused-rotary-pos-emb", action="store_true", help="fused RoPE (npu_rotary_mul)")
    g.add_argument("--use-fused-swiglu", action="store_true", help="fused SwiGLU (npu_swiglu)")
    g.add_argument("--use-mc2", action="store_true", help="accepted for ModelLink scripts; no effect")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--no-shared-storage", action="store_true",
                   help="nodes do not share a file system: every node's first rank writes its own checkpoint files "
                        "and builds its own data index")


def _training(p):
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="samples per iteration (default micro batch x data-parallel size)")
    g.add_argument("--train-iters", type=int, required=False, default=None)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", default="linear", choices=["constant", "linear", "cosine", "inverse-square-root"])
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default --train-iters")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float, default=None, help="warm-up as a fraction of the decay iters")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32, help="fp16 dynamic loss scale start")


def _data(p):
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="dataset prefixes from tools/preprocess_data.py, optionally weighted: 'w1 p1 w2 p2'")
    g.add_argument("--split", default="969,30,1", help="train,valid,test proportions")
    g.add_argument("--is-instruction-dataset", action="store_true",
                   help="--data-path is GeneralInstructionHandler output (loss on responses only)")
    g.add_argument("--mock-data", action="store_true", help="random tokens (benchmarks, smoke tests)")
    g.add_argument("--tokenizer-type", default="PretrainedFromHF", choices=["PretrainedFromHF"])
    g.add_argument("--tokenizer-name-or-path", default=None, help="Hugging Face tokenizer directory")
    g.add_argument("--tokenizer-not-use-fast", action="store_true")
    g.add_argument("--data-cache-path", default=None, help="where megatron-core caches dataset indices")


def _checkpoint(p):
    g = p.add_argument_group("checkpoints")
    g.add_argument("--load", default=None, help="checkpoint directory to resume (or fine-tune) from")
    g.add_argument("--save", default=None, help="checkpoint directory to write")
    g.add_argument("--save-interval", type=int, default=None, help="save every N iterations (and at the end)")
    g.add_argument("--finetune", action="store_true", help="load model weights only and start at iteration 0")
    g.add_argument("--no-load-optim", action="store_true", help="do not load optimizer / scheduler state")
    g.add_argument("--no-load-rng", action="store_true", help="do not load RNG state")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true",
                   help="error out when --load holds no checkpoint (default: start from random weights)")


def _logging(p):
    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=0, help="validation iterations per evaluation (0: none)")
    g.add_argument("--exit-interval", type=int, default=None, help="stop after an iteration divisible by this")
    g.add_argument("--tensorboard-dir", default=None, help="write TensorBoard scalars here")
    g.add_argument("--metrics-file", default=None,
                   help="append one JSON line per logged iteration: iteration, lm_loss, grad_norm, learning_rate, "
                        "tokens_per_sec_per_device, step_time_s, mfu (where the device peak is known), memory")
    g.add_argument("--device-peak-tflops", type=float, default=None,
                   help="peak dense TFLOP/s of one device for MFU (default: from the table for known devices)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="torchrun ... -m aquila_npu.pretrain",
        description="Pretrain or fine-tune Aquila2 on megatron-core (tensor, pipeline and data parallel) on Ascend "
                    "NPUs, NVIDIA GPUs or CPUs. Flags follow Megatron-LM / ModelLink.")
    for add in (_model, _parallel, _training, _data, _checkpoint, _logging):
        add(p)
    return p


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse and check the flags that can be checked without the device or a checkpoint."""
    p = parser()
    args = p.parse_args(argv)
    try:
        validate(args)
    except UsageError as e:
        p.error(str(e))
    return args


def validate(args: argparse.Namespace) -> None:
    if args.bf16 and args.fp16:
        raise UsageError("--bf16 and --fp16 exclude each other")
    if args.train_iters is None or args.train_iters < 0:
        raise UsageError("--train-iters is required (>= 0)")
    if args.finetune and not args.load:
        raise UsageError("--finetune needs --load (the checkpoint to fine-tune)")
    if args.is_instruction_dataset and args.mock_data:
        raise UsageError("--is-instruction-dataset and --mock-data exclude each other")
    if not args.mock_data and not args.data_path:
        raise UsageError("--data-path is required (or --mock-data)")
    if not args.mock_data and not args.tokenizer_name_or_path:
        raise UsageError("--tokenizer-name-or-path is required with --data-path")
    if args.group_query_attention and args.num_query_groups is None:
        raise UsageError("--group-query-attention needs --num-query-groups")
    if args.num_query_groups is not None and not args.group_query_attention:
        raise UsageError("--num-query-groups needs --group-query-attention")
    if args.recompute_method and args.recompute_granularity != "full":
        raise UsageError("--recompute-method needs --recompute-granularity full")
    if args.recompute_granularity == "full" and not (args.recompute_method and args.recompute_num_layers):
        raise UsageError("--recompute-granularity full needs --recompute-method and --recompute-num-layers")
    for flag in ("micro_batch_size", "log_interval", "eval_interval"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.save_interval is not None and args.save_interval < 1:
        raise UsageError("--save-interval must be >= 1")
    if args.lr_warmup_fraction is not None and args.lr_warmup_iters:
        raise UsageError("--lr-warmup-fraction and --lr-warmup-iters exclude each other")
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        args.sequence_parallel = False  # as Megatron-LM: meaningless at tp 1


def fused_ops(args) -> FusedOps:
    return FusedOps.from_args(args)
