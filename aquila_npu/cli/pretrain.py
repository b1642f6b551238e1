"""``python -m aquila_npu.pretrain`` (also ``aquila-pretrain``): pretraining and fine-tuning with the Megatron-LM /
ModelLink flags users already pass; ``torchrun ... -m aquila_npu.pretrain`` for several processes. The training run
itself: ``aquila_npu.training``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from aquila_npu.cli.common import Parser, add_device_argument, run_cli
from aquila_npu.device.fused import FusedOps
from aquila_npu.errors import UsageError
from aquila_npu.flags import add_inert_arguments, check_positive
from aquila_npu.lora import settings as lora_settings
from aquila_npu.models import arch_flags
from aquila_npu.models.registry import MODELS
from aquila_npu.training import speed
from aquila_npu.training.speed import StepSwitches

PROG = "aquila_npu.pretrain"
INERT = ("--swiglu", "--disable-bias-linear", "--attention-softmax-in-fp32", "--no-masked-softmax-fusion",
         "--no-gradient-accumulation-fusion", "--exit-signal-handler", "--lora-ckpt-filter")


def _model(p):
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help=f"a registry name ({', '.join(sorted(MODELS))}) whose architecture fills the flags below; "
                        "or the --load checkpoint's; or the flags alone")
    g.add_argument("--seq-length", type=int, help="training sequence length (default: the model's positions)")
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--init-method-std", type=float, default=0.02)
    arch_flags.add_arguments(p, "architecture (from --model or the --load checkpoint when not given; checked "
                                "against them when given)")


def _parallel(p):
    g = p.add_argument_group("parallelism and device")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true", help="megatron-core sequence parallelism (tp > 1)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard optimizer state across data-parallel ranks (megatron-core DistributedOptimizer)")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="overlap the data-parallel gradient all-reduce (reduce-scatter with the distributed "
                        "optimizer) with the backward pass, bucket by bucket (megatron-core DDP; off by default, as "
                        "in Megatron-LM)")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="overlap the distributed optimizer's parameter all-gather with the next forward pass "
                        "(needs --use-distributed-optimizer and --overlap-grad-reduce, as in Megatron-LM)")
    g.add_argument("--ddp-bucket-size", type=int, default=None,
                   help="parameters per gradient-reduction bucket with --overlap-grad-reduce (default "
                        "megatron-core's: max(40M, 1M x data-parallel size)); without overlap there is one bucket")
    g.add_argument("--accumulate-allreduce-grads-in-fp32", action=argparse.BooleanOptionalAction, default=True,
                   help="accumulate and reduce gradients in fp32. On by default here for every dtype (Megatron-LM "
                        "turns it on for bf16 but leaves fp16 reducing in fp16 unless given); "
                        "--no-accumulate-allreduce-grads-in-fp32 accumulates and reduces in the training dtype")
    add_device_argument(g)
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
    g.add_argument("--reset-attention-mask", action="store_true",
                   help="attention never crosses a document: with --is-instruction-dataset whole samples are packed "
                        "several to a sequence (samples of ~80 tokens no longer pad a 2048-token sequence; "
                        "--global-batch-size then counts sequences); with pretraining data the documents of a "
                        "sequence are split at their EOD token (preprocess with --append-eod). Rotary positions "
                        "restart at each document")
    g.add_argument("--reset-position-ids", action="store_true",
                   help="position ids restart at each document (Megatron-LM's flag; with rotary embeddings they "
                        "restart with --reset-attention-mask, which it needs)")
    g.add_argument("--eod-mask-loss", action="store_true",
                   help="pretraining data: no loss where the input token is EOD (Megatron-LM's flag)")


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
    g.add_argument("--exit-interval", type=int, default=None,
                   help="stop after an iteration divisible by this (saving a checkpoint with --save)")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="stop after this many minutes of running, at the end of an iteration, saving a checkpoint "
                        "with --save (for schedulers with time limits); SIGTERM / SIGINT do the same")
    g.add_argument("--tensorboard-dir", default=None, help="write TensorBoard scalars here")
    g.add_argument("--metrics-file", default=None,
                   help="append one JSON line per logged iteration: iteration, lm_loss, grad_norm, learning_rate, "
                        "tokens_per_sec_per_device, step_time_s, mfu (where the device peak is known), memory; the "
                        "first also run_features (overlap, bucket size, causal mask, gradient norm kernel, peak)")
    g.add_argument("--device-peak-tflops", type=float, default=None,
                   help="peak dense bf16/fp16 TFLOP/s of one device for MFU (default: aquila_npu.flops's table "
                        "for the device name torch reports; an unknown device has no MFU until this is given)")
    g.add_argument("--layer-stats", default=None, metavar="FILE",
                   help="write per-layer statistics of the first --layer-stats-iters iterations to FILE (JSON lines: "
                        "every layer's input / output norm, the logits', every parameter's gradient norm, over the "
                        "whole batch whatever the layout); compare two runs of the same checkpoint and data with "
                        "python -m aquila_npu.selfcheck --compare A B")
    g.add_argument("--layer-stats-iters", type=int, default=3, help="iterations --layer-stats records (default 3)")


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="Pretrain or fine-tune Aquila2 on megatron-core (tensor, pipeline and data parallel) on Ascend "
                    "NPUs, NVIDIA GPUs or CPUs. Flags follow Megatron-LM / ModelLink.")
    for add in (_model, _parallel, _training, _data, _checkpoint, _logging):
        add(p)
    FusedOps.add_arguments(p)
    StepSwitches.add_arguments(p)
    lora_settings.add_arguments(p)
    add_inert_arguments(p, INERT)
    return p


def parse(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse and check the flags that can be checked without the device or a checkpoint (a ``UsageError``)."""
    args = parser().parse_args(argv)
    validate(args)
    return args


def validate(args: argparse.Namespace) -> None:
    if args.bf16 and args.fp16:
        raise UsageError("--bf16 and --fp16 exclude each other")
    if args.train_iters is None or args.train_iters < 1:
        raise UsageError("--train-iters is required (>= 1)" if args.train_iters is None else
                         f"--train-iters {args.train_iters} must be >= 1")
    if args.finetune and not args.load:
        raise UsageError("--finetune needs --load (the checkpoint to fine-tune)")
    if args.is_instruction_dataset and args.mock_data:
        raise UsageError("--is-instruction-dataset and --mock-data exclude each other")
    if args.mock_data and args.data_path:
        raise UsageError("--mock-data and --data-path exclude each other: --mock-data trains on random tokens and "
                         "would never read the data")
    if not args.mock_data and not args.data_path:
        raise UsageError("--data-path is required (or --mock-data)")
    if not args.mock_data and not args.tokenizer_name_or_path:
        raise UsageError("--tokenizer-name-or-path is required with --data-path")
    arch_flags.validate(arch_flags.given(args))
    if args.recompute_method and args.recompute_granularity != "full":
        raise UsageError("--recompute-method needs --recompute-granularity full")
    if args.recompute_granularity == "full" and not (args.recompute_method and args.recompute_num_layers):
        raise UsageError("--recompute-granularity full needs --recompute-method and --recompute-num-layers")
    for flag in ("micro_batch_size", "log_interval", "eval_interval"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1")
    check_positive(args, "save_interval", "seq_length", "exit_interval", "layer_stats_iters")
    if args.layer_stats and os.path.isdir(args.layer_stats):
        raise UsageError(f"--layer-stats {args.layer_stats} is a directory, not a file")
    for flag in ("lr", "min_lr"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= 0")
    if args.exit_duration_in_mins is not None and not args.exit_duration_in_mins > 0:
        raise UsageError(f"--exit-duration-in-mins {args.exit_duration_in_mins} must be > 0")
    _check_split(args.split)
    speed.validate(args)
    for flag in ("save", "load"):
        path = getattr(args, flag)
        if path and os.path.exists(path) and not os.path.isdir(path):
            raise UsageError(f"--{flag} {path} is a file, not a checkpoint directory")
    if args.overlap_param_gather and not (args.use_distributed_optimizer and args.overlap_grad_reduce):
        raise UsageError("--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce")
    if args.ddp_bucket_size is not None and args.ddp_bucket_size < 1:
        raise UsageError("--ddp-bucket-size must be >= 1")
    if args.lr_warmup_fraction is not None and args.lr_warmup_iters:
        raise UsageError("--lr-warmup-fraction and --lr-warmup-iters exclude each other")
    if args.reset_position_ids and not args.reset_attention_mask:
        raise UsageError("--reset-position-ids needs --reset-attention-mask: with rotary embeddings the positions "
                         "restart at the documents the attention is split at")
    if args.mock_data and (args.reset_attention_mask or args.eod_mask_loss):
        raise UsageError(f"{'--reset-attention-mask' if args.reset_attention_mask else '--eod-mask-loss'} needs "
                         "documents: --mock-data has none")
    if args.eod_mask_loss and args.is_instruction_dataset:
        raise UsageError("--eod-mask-loss is for pretraining documents: instruction data trains its answers (EOD "
                         "included) and masks its prompts by its labels")


def _check_split(split: str) -> None:
    """Megatron's --split: up to three non-negative proportions (train, valid, test), not all zero."""
    parts = split.replace("/", ",").split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if not values or len(values) > 3 or any(v < 0 for v in values) or not sum(values) > 0:
        raise UsageError(f"--split {split}: expected up to three non-negative train,valid,test proportions, not all "
                         "zero (e.g. 969,30,1)")


def main(argv: Optional[List[str]] = None) -> int:
    return run_cli(PROG, parse, "aquila_npu.jobs.pretrain:run", argv)


if __name__ == "__main__":
    sys.exit(main())
