"""A training run: device, model, optimizer, data, checkpoint, then the iteration loop."""

from __future__ import annotations

import math
import os
import time
from typing import Optional

import torch

from aquila_npu.checkpoint.megatron_io import CheckpointInfo
from aquila_npu.device.setup import setup
from aquila_npu.errors import CheckpointError, UsageError
from aquila_npu.flops import device_peak, training_flops_per_token
from aquila_npu.flags import inert_note
from aquila_npu.models.config import transformer_config
from aquila_npu.models.dtypes import dtype_name, short_name
from aquila_npu.models.gpt import build_model
from aquila_npu.outputs import owner
from aquila_npu.parallel import initialize_model_parallel
from aquila_npu.training import adam, batches, checkpointing, memory_plan
from aquila_npu.training.config import RunConfig, resolve
from aquila_npu.training.features import run_features
from aquila_npu.training.inputs import check_paths
from aquila_npu.training.param_gather import ParamGatherHooks
from aquila_npu.training.report import Reporter, device_memory
from aquila_npu.training.step import eval_step, host_values, train_step
from aquila_npu.training.stopping import StopConditions
from aquila_npu.training.transforms import ModelTransform


def _print0(*a):
    if torch.distributed.get_rank() == 0:
        print(*a, flush=True)


def _print_first(*a):
    """print on the first process before torch.distributed exists (torchrun's RANK)."""
    if os.environ.get("RANK", "0") == "0":
        print(*a, flush=True)


def _load_tokenizer(args):
    if not args.tokenizer_name_or_path:
        return None
    from aquila_npu.data.tokenizer import MCoreTokenizer

    return MCoreTokenizer.from_pretrained(args.tokenizer_name_or_path, use_fast=not args.tokenizer_not_use_fast)


def build(args, cfg: RunConfig, dev, transform: Optional[ModelTransform] = None):
    """(DDP-wrapped model stage, optimizer, scheduler)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    spec, layout, dtype = cfg.spec, cfg.layout, cfg.params_dtype
    switches = cfg.switches  # (issue 28: --compile-elementwise, --loss-chunk-size)
    base_backend = dev.backend
    if switches.compile_elementwise:
        from aquila_npu.device.compiled import CompiledBackend

        base_backend = CompiledBackend(dev.backend)
    recompute = {}
    if args.recompute_granularity:
        recompute = {"recompute_granularity": args.recompute_granularity,
                     "recompute_method": args.recompute_method, "recompute_num_layers": args.recompute_num_layers}
    tcfg = transformer_config(spec, tensor_parallel=layout.tp, pipeline_parallel=layout.pp,
                              sequence_parallel=cfg.sequence_parallel, params_dtype=dtype,
                              hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
                              init_method_std=args.init_method_std, calculate_per_token_loss=True,
                              use_cpu_initialization=dev.name == "cpu", **recompute,
                              **base_backend.config_overrides())
    pp_rank = ps.get_pipeline_model_parallel_rank()
    backend = base_backend if transform is None else transform.backend(base_backend)  # (QLoRA: 4-bit linears)
    model = build_model(spec, tcfg, backend, padded_vocab=layout.padded_vocab, pre_process=pp_rank == 0,
                        post_process=pp_rank == layout.pp - 1, pp_rank=pp_rank, parallel_output=True,
                        max_sequence_length=spec.max_position_embeddings,
                        loss_chunk_size=switches.loss_chunk_size)
    if transform is not None:  # (LoRA: adapters on the frozen base) before DDP and the optimizer see the parameters
        model = transform.apply(model, tcfg, layout, pp_rank, args.seed)
    model.to(dev.torch_device)
    ddp = DistributedDataParallel(config=tcfg, module=model, ddp_config=ddp_config(args))
    optimizer = adam.get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
                        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
                        clip_grad=args.clip_grad, bf16=args.bf16, fp16=args.fp16, params_dtype=dtype,
                        initial_loss_scale=args.initial_loss_scale if args.fp16 else None,
                        use_distributed_optimizer=args.use_distributed_optimizer),
        [ddp], dev.name)
    gbs = cfg.global_batch_size
    decay_iters = args.lr_decay_iters or args.train_iters
    warmup = args.lr_warmup_iters
    if args.lr_warmup_fraction is not None:
        warmup = int(args.lr_warmup_fraction * decay_iters)
    if warmup and warmup >= decay_iters:
        raise UsageError(f"LR warm-up ({warmup} iterations) must be shorter than the decay "
                            f"(--lr-decay-iters / --train-iters: {decay_iters})")
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=args.lr, min_lr=args.min_lr, lr_warmup_steps=warmup * gbs,
        lr_decay_steps=max(decay_iters, 1) * gbs, lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay,
        end_wd=args.weight_decay, wd_incr_steps=max(args.train_iters, 1) * gbs, wd_incr_style="constant")
    tcfg.no_sync_func = ddp.no_sync
    if args.overlap_grad_reduce:  # as Megatron-LM (align_grad_reduce): later pipeline stages reduce in the bubble
        tcfg.grad_sync_func = ddp.start_grad_sync
    tcfg.finalize_model_grads_func = finalize_model_grads
    if switches.no_step_syncs:  # (issue 28) the token count, gradient norm and clipping stay on the device
        from aquila_npu.training import no_syncs

        no_syncs.install(tcfg)
    if args.fp16:
        tcfg.grad_scale_func = optimizer.scale_loss
    return ddp, optimizer, scheduler


def ddp_config(args):
    """megatron-core's DistributedDataParallelConfig from Megatron-LM's flags (--overlap-grad-reduce,
    --overlap-param-gather, --ddp-bucket-size, --accumulate-allreduce-grads-in-fp32)."""
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.accumulate_allreduce_grads_in_fp32, overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather, bucket_size=args.ddp_bucket_size,
        use_distributed_optimizer=args.use_distributed_optimizer)


def datasets(args, cfg: RunConfig, tokenizer):
    """(train, valid) datasets holding at least the samples this run consumes."""
    gbs, seq = cfg.global_batch_size, cfg.seq_length
    n_train = args.train_iters * gbs
    n_valid = (args.train_iters // args.eval_interval + 1) * args.eval_iters * gbs if args.eval_iters else 0
    if args.mock_data:
        vocab = tokenizer.vocab_size if tokenizer is not None else cfg.spec.vocab_size
        valid = batches.MockDataset(n_valid, seq, vocab, args.seed + 1) if n_valid else None
        return batches.MockDataset(n_train, seq, vocab, args.seed), valid
    from aquila_npu.data import datasets as data

    sizes = [n_train, n_valid, 0]
    if args.is_instruction_dataset:
        train, valid, _ = data.build_instruction_datasets(args.data_path, args.split, seq, args.seed,
                                                          sizes, tokenizer=tokenizer,
                                                          data_cache_path=args.data_cache_path,
                                                          pack=args.reset_attention_mask)
    else:
        train, valid, _ = data.build_pretrain_datasets(args.data_path, args.split, seq, args.seed,
                                                       tokenizer, sizes, data_cache_path=args.data_cache_path,
                                                       reset_position_ids=args.reset_position_ids,
                                                       reset_attention_mask=args.reset_attention_mask,
                                                       eod_mask_loss=args.eod_mask_loss)
    if train is None:
        raise UsageError(f"--split {args.split} leaves no training data")
    return train, valid if n_valid else None


def check(args, world_size: int, transform: Optional[ModelTransform] = None):
    """Every input error a run can find before any process group exists, for ``world_size`` processes: (the --load
    checkpoint's description or None, the tokenizer or None, the run's config). The pre-flight of a launch
    (``python -m aquila_npu.preflight``) runs this once before torchrun starts the workers."""
    check_paths(args)
    checkpoint = CheckpointInfo.find(args.load)  # read once; rank 0's file is loaded from it again in the run
    if args.load and checkpoint is None and (args.finetune or args.exit_on_missing_checkpoint):
        raise CheckpointError(f"--load {args.load}: no checkpoint there (no latest_checkpointed_iteration.txt)")
    tokenizer = _load_tokenizer(args)
    cfg = resolve(args, checkpoint, tokenizer.vocab_size if tokenizer is not None else None, world_size)
    # what the checkpoints' metadata refutes (layout, distributed optimizer, the adapter's model), before any output
    if transform is not None:  # (LoRA: the base's layout; the adapter's model, layout and optimizer state)
        transform.check(args, checkpoint, cfg.layout, cfg.data_parallel_size)
    elif checkpoint is not None:
        if checkpoint.is_nf4:
            raise CheckpointError(f"--load {args.load} holds a 4-bit NF4 base (convert_ckpt.py --qlora-nf4), which "
                                  "only adapters train on: add --qlora --lora-target-modules ...")
        checkpoint.check_resume(cfg.layout, finetune=args.finetune, no_load_optim=args.no_load_optim,
                                use_distributed_optimizer=args.use_distributed_optimizer,
                                data_parallel_size=cfg.data_parallel_size)
    if not args.mock_data:
        from aquila_npu.data import checks, datasets as data

        checks.check(data.indexed_prefixes(args.data_path, args.is_instruction_dataset), cfg.spec.vocab_size)
        if args.reset_attention_mask and not args.is_instruction_dataset:
            checks.check_documents_end_with(data.indexed_prefixes(args.data_path), tokenizer.eod,
                                            "--reset-attention-mask")
    return checkpoint, tokenizer, cfg


def run(args, transform: Optional[ModelTransform] = None) -> int:
    """Train as the parsed flags say (``aquila_npu.cli.pretrain``), the model changed by ``transform`` (LoRA; given by
    ``aquila_npu.jobs.pretrain``, which also checks its inputs first); every input error before any work."""
    if args.load and args.save and os.path.realpath(args.load) == os.path.realpath(args.save):
        owner.restore_aside(args.save, say=_print_first)  # a checkpoint a killed run left moved aside, before reading
    checkpoint, tokenizer, cfg = check(args, int(os.environ.get("WORLD_SIZE", "1")), transform)
    from aquila_npu.device.setup import resolve as resolve_device
    from aquila_npu.training import speed

    speed.check_device(cfg.switches, resolve_device(args.device),
                       bool(getattr(args, "profile_breakdown", None)))  # (issue 28) before the device is set up
    dev = setup(args.device, cfg.fused)
    save_dir = checkpointing.SaveDir.claim(args.save, args.no_shared_storage) if args.save else None
    try:
        return _train(args, cfg, dev, checkpoint, tokenizer, transform, save_dir)
    finally:
        if save_dir is not None:
            save_dir.release()


def _train(args, cfg: RunConfig, dev, checkpoint, tokenizer, transform: Optional[ModelTransform], save_dir) -> int:
    from megatron.core import parallel_state as ps

    world, dp = torch.distributed.get_world_size(), cfg.data_parallel_size
    initialize_model_parallel(cfg.tp, cfg.pp, args.seed)
    if dev.runtime_line():
        _print0(dev.runtime_line())
    if transform is None:  # (the plan has no LoRA: a frozen base has no gradients or optimizer states)
        memory_plan.announce(args, cfg, dev, _print0)  # before the model is built
    model, optimizer, scheduler = build(args, cfg, dev, transform)
    param_gather = ParamGatherHooks(model, args.overlap_param_gather)
    iteration, consumed = 0, 0
    if transform is not None:  # (LoRA: the --load base, weights only, then the --lora-load adapter)
        iteration, consumed, what = transform.load(args, checkpoint, model=model, optimizer=optimizer,
                                                   scheduler=scheduler, layout=cfg.layout,
                                                   params_dtype=cfg.params_dtype, device=dev.name)
        _print0(f"loaded {what}; continuing at iteration {iteration}")
        _print0(transform.describe(model, optimizer))  # collective: every rank computes it
    elif checkpoint is not None:
        iteration, consumed, what = checkpointing.load(
            checkpoint, model=model, optimizer=optimizer, scheduler=scheduler, layout=cfg.layout,
            params_dtype=cfg.params_dtype, finetune=args.finetune, no_load_optim=args.no_load_optim,
            no_load_rng=args.no_load_rng, use_distributed_optimizer=args.use_distributed_optimizer, device=dev.name)
        _print0(f"loaded {what} from {args.load} (iteration {checkpoint.iteration}); continuing at iteration "
                f"{iteration}")
    elif args.load:
        _print0(f"warning: --load {args.load} holds no checkpoint; starting from random weights")
    _print0(f"aquila_npu.pretrain: {cfg.spec.name} on {dev.name} (kernels {dev.kernels}: {dev.backend.describe()}), "
            f"tp{cfg.tp} pp{cfg.pp} dp{dp}, {dtype_name(cfg.params_dtype)}, seq {cfg.seq_length}, global batch {cfg.global_batch_size} = "
            f"{cfg.num_microbatches} micro-batches x {cfg.micro_batch_size} x dp{dp}, "
            f"{cfg.spec.num_parameters():,} parameters, optimizer {adam.for_device(dev.name).describe()}"
            + inert_note(args))
    dp_rank = ps.get_data_parallel_rank()
    train_ds, valid_ds = datasets(args, cfg, tokenizer)
    _say_packing(train_ds, cfg)
    train_iter = batches.micro_batches(train_ds, consumed_samples=consumed, micro_batch_size=args.micro_batch_size,
                                       dp_rank=dp_rank, dp_size=dp)
    valid_iter = batches.cycle_for_eval(valid_ds, args.micro_batch_size, dp_rank, dp)
    is_writer = torch.distributed.get_rank() == world - 1
    reporter = Reporter(is_writer=is_writer, train_iters=args.train_iters, metrics_file=args.metrics_file,
                        tensorboard_dir=args.tensorboard_dir)
    flops_per_token = training_flops_per_token(cfg.spec, cfg.seq_length, cfg.layout.padded_vocab)
    peak = device_peak(torch.cuda.get_device_name() if dev.name != "cpu" else None, args.device_peak_tflops)
    if peak.tflops is None and dev.name != "cpu":
        _print0(f"warning: {peak.source}")
    reporter.log_features(run_features(model, peak))
    # A micro-batch of several documents per sequence reaches the model as one packed sequence of b * s tokens
    # (training.packing): the pipeline schedule's activation shapes are that sequence's.
    packed = args.reset_attention_mask
    step_kw = dict(num_microbatches=cfg.num_microbatches,
                   seq_length=cfg.seq_length * (cfg.micro_batch_size if packed else 1),
                   micro_batch_size=1 if packed else cfg.micro_batch_size)
    skipped, last_saved = 0, iteration
    stats = _layer_stats(args, cfg, dev, model, optimizer, iteration)
    profile = _step_profile(args, cfg, dev, iteration, is_writer)  # (issue 28: --profile-breakdown)
    no_step_syncs = cfg.switches.no_step_syncs
    stop = StopConditions(dev.torch_device, args.exit_duration_in_mins)
    stop.install()
    try:
        while iteration < args.train_iters:
            t0 = time.perf_counter()
            if stats is not None:
                stats.begin(iteration + 1)
            if profile is not None:
                profile.begin(iteration + 1)
            out = host_values(train_step(train_iter, model, optimizer, scheduler, sync=not no_step_syncs,
                                         global_batch_size=cfg.global_batch_size, **step_kw))
            if profile is not None:
                profile.end(iteration + 1)
            if stats is not None:
                stats.end(iteration + 1, out["lm_loss"])
            if dev.name != "cpu":
                torch.cuda.synchronize()
            step_time = time.perf_counter() - t0
            iteration += 1
            consumed += cfg.global_batch_size
            skipped += int(out["skipped"])
            param_gather.after_step(not out["skipped"])
            if not math.isfinite(out["lm_loss"]) and ps.is_pipeline_last_stage():
                raise FloatingPointError(f"loss is {out['lm_loss']} at iteration {iteration}")
            if reporter.is_writer and out["loss_tokens"] == 0:
                print(f"warning: iteration {iteration} had no tokens to learn from (all masked: instruction prompts "
                      f"longer than --seq-length {cfg.seq_length}?)", flush=True)
            if iteration % args.log_interval == 0:
                tokens_per_device = cfg.global_batch_size * cfg.seq_length / step_time / world
                tflops = tokens_per_device * flops_per_token / 1e12
                reporter.log(iteration, {
                    "consumed_samples": consumed, "lm_loss": out["lm_loss"], "grad_norm": out["grad_norm"],
                    "loss_tokens": out["loss_tokens"],
                    "learning_rate": optimizer.param_groups[0]["lr"], "global_batch_size": cfg.global_batch_size,
                    "loss_scale": optimizer.get_loss_scale().item() if args.fp16 else None,
                    "skipped_iterations": skipped, "step_time_s": step_time,
                    "tokens_per_sec_per_device": tokens_per_device, "tflops_per_device": tflops,
                    "mfu": tflops / peak.tflops if peak.tflops else None, "memory": device_memory(),
                    "device": dev.name})
            if valid_iter is not None and iteration % args.eval_interval == 0:
                with param_gather.gathered():
                    losses = [eval_step(valid_iter, model, **step_kw) for _ in range(args.eval_iters)]
                reporter.log_eval(iteration, sum(losses) / len(losses))
            if save_dir is not None and args.save_interval and iteration % args.save_interval == 0:
                with param_gather.gathered():
                    _save(args, cfg, dev, save_dir, transform, iteration, model, optimizer, scheduler, consumed)
                last_saved = iteration
            why = stop.check()  # every rank, every iteration: SIGTERM / SIGINT, --exit-duration-in-mins
            if why is None and args.exit_interval and iteration % args.exit_interval == 0:
                why = f"--exit-interval {args.exit_interval}"
            if why is not None:
                _print0(f"stopping after iteration {iteration} ({why})" +
                        ("" if save_dir is not None else "; no --save: nothing saved"))
                break
        if save_dir is not None and last_saved != iteration:
            with param_gather.gathered():
                _save(args, cfg, dev, save_dir, transform, iteration, model, optimizer, scheduler, consumed)
    finally:
        stop.restore()
        reporter.close()
    return 0


def _step_profile(args, cfg: RunConfig, dev, iteration: int, is_writer: bool):
    """``--profile-breakdown FILE``: where one iteration's time goes (training/profile.py)."""
    if not getattr(args, "profile_breakdown", None):
        return None
    from aquila_npu.flops import training_flops_breakdown
    from aquila_npu.training.profile import StepProfile

    step = args.profile_step or min(iteration + 2, args.train_iters)
    _print0(f"profiling iteration {step} into {args.profile_breakdown}")
    return StepProfile(args.profile_breakdown, step, dev.name, cfg.layout.padded_vocab,
                       training_flops_breakdown(cfg.spec, cfg.seq_length, cfg.layout.padded_vocab),
                       cfg.global_batch_size * cfg.seq_length // (cfg.data_parallel_size * cfg.tp * cfg.pp), is_writer,
                       meta={"model": cfg.spec.name, "seq_length": cfg.seq_length,
                             "micro_batch_size": cfg.micro_batch_size, "global_batch_size": cfg.global_batch_size,
                             "dtype": short_name(cfg.params_dtype), "kernels": dev.backend.describe(),
                             "switches": cfg.switches.requested()})


def _layer_stats(args, cfg: RunConfig, dev, model, optimizer, iteration: int):
    """``--layer-stats FILE``: per-layer norms of the next ``--layer-stats-iters`` iterations (training/layer_stats.py)."""
    if not getattr(args, "layer_stats", None):
        return None
    from aquila_npu.training.layer_stats import LayerStats

    meta = {"model": cfg.spec.name, "num_layers": cfg.spec.num_layers, "device": dev.name,
            "dtype": short_name(cfg.params_dtype), "tp": cfg.tp, "pp": cfg.pp, "dp": cfg.data_parallel_size,
            "seq_length": cfg.seq_length, "global_batch_size": cfg.global_batch_size,
            "micro_batch_size": cfg.micro_batch_size, "padded_vocab": cfg.layout.padded_vocab, "seed": args.seed,
            "load": args.load,
            "data": args.data_path or "mock", "first_iteration": iteration + 1,
            "distributed_optimizer": bool(args.use_distributed_optimizer), "kernels": dev.backend.describe()}
    stats = LayerStats(model, cfg, args.layer_stats, iteration + args.layer_stats_iters,
                       recompute_full=args.recompute_granularity == "full", recompute_method=args.recompute_method,
                       recompute_num_layers=args.recompute_num_layers, meta=meta)
    stats.optimizer = optimizer
    _print0(f"layer statistics of iterations {iteration + 1}-{iteration + args.layer_stats_iters} to "
            f"{args.layer_stats} (compare two runs: python -m aquila_npu.selfcheck --compare A B)")
    return stats


def _say_packing(dataset, cfg: RunConfig) -> None:
    """One line on how instruction samples fill the sequences, and the samples cut at --seq-length."""
    parts = getattr(dataset, "datasets", [dataset])  # a blend of several --data-path prefixes, or one dataset
    if not all(hasattr(d, "truncated") for d in parts):
        return
    truncated = sum(d.truncated for d in parts)
    cut = (f"; {truncated} sample(s) longer than --seq-length {cfg.seq_length} are truncated, as unpacked"
           if truncated else "")
    if all(getattr(d, "packs", None) is not None for d in parts):
        samples, packs = sum(d.samples for d in parts), sum(len(d.packs) for d in parts)
        fill = sum(d.fill * len(d.packs) for d in parts) / max(packs, 1)
        _print0(f"packed instruction data: {samples} samples in {packs} sequences of {cfg.seq_length} tokens "
                f"({samples / max(packs, 1):.1f} per sequence, {fill:.1%} of the positions filled){cut}")
    elif truncated:
        _print0(f"instruction data: {cut[2:]}")


def _save(args, cfg: RunConfig, dev, save_dir, transform, iteration, model, optimizer, scheduler, consumed):
    t = time.perf_counter()
    if transform is not None:  # (LoRA: the adapters and their optimizer state only)
        transform.save(args, save_dir, iteration, model=model, optimizer=optimizer, scheduler=scheduler,
                       layout=cfg.layout, consumed_samples=consumed, device=dev.name)
    else:
        checkpointing.save(save_dir, iteration, model=model, optimizer=optimizer, scheduler=scheduler,
                           layout=cfg.layout, params_dtype=cfg.params_dtype, consumed_samples=consumed, args=args,
                           use_distributed_optimizer=args.use_distributed_optimizer, device=dev.name)
    _print0(f"saved checkpoint at iteration {iteration} to {args.save} in {time.perf_counter() - t:.1f}s")
