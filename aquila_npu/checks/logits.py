"""The logits check: our megatron-core model against Hugging Face transformers' ``LlamaForCausalLM`` on the same
tokens, on this device, in any tensor/pipeline layout (``torchrun``), fused kernels on an NPU.

Without ``--load`` every rank builds the registry's ``aquila2-tiny-gqa`` from the seeded weights of
``aquila_npu.weights.seeded`` (the same on every rank, whatever transformers' initialisation), loads its stage
through the weight-mapping table and compares; with ``--load CKPT --hf-dir HF`` a converted checkpoint against the
Hugging Face model it came from, run by the class its config.json names (``reference_class``: BAAI's
``AquilaForCausalLM`` through FlagAI's package where installed, else ``LlamaForCausalLM``; the output says which).
The last pipeline stage (TP rank 0) prints max |ours - HF|, writes the result to
``--out`` and ends the command with ``CheckFailed`` (exit status 1) when it is out of tolerance.
"""

from __future__ import annotations

import json
import os
import sys

from aquila_npu.errors import CheckFailed, CheckpointError, UsageError
from aquila_npu.outputs.files import write_json

MODEL = "aquila2-tiny-gqa"
SEED = 0
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 2e-2}


def _check_reference(hf_dir: str, load: str, spec) -> bool:
    """The --hf-dir model before transformers loads it: the --load checkpoint's architecture (a different model
    would fail deep in the comparison), its weights safetensors or pickles that ``safe_load`` accepts
    (``hf_io.reference_weights``). Returns ``use_safetensors`` for ``from_pretrained``."""
    from aquila_npu.checkpoint.hf_io import reference_weights
    from aquila_npu.models.arch_flags import differences
    from aquila_npu.models.hf_config import spec_from_hf_config

    theirs = spec_from_hf_config(hf_dir)
    diff = differences(theirs, spec)
    if diff:
        raise CheckpointError(f"--hf-dir {hf_dir} is another model than the --load checkpoint {load} "
                              f"({'; '.join(diff)}): pass the Hugging Face folder it was converted from")
    return reference_weights(hf_dir)


AQUILA_CODE = "flagai.model.aquila2.modeling_aquila"  # BAAI's AquilaForCausalLM, as the flagai package ships it


def baai_rope_scaling(config, factor):
    """``config`` (BAAI's ``AquilaConfig``) with ``rope_scaling`` as BAAI's code reads it: None, or BAAI's config.json
    form ``{"type": "linear", "factor": f}``. transformers 5 keeps ``rope_scaling`` as ``rope_parameters``, always a
    dict (``rope_type`` "default" without scaling), where BAAI's ``_init_rope`` wants None or a ``type`` key."""
    config.rope_scaling = {"type": "linear", "factor": factor} if factor else None
    return config


def load_reference(hf_class, hf_dir: str, spec, dtype, use_safetensors: bool):
    """The ``--hf-dir`` model in ``hf_class``, in eval mode. transformers' ``from_pretrained`` for its own classes;
    BAAI's ``AquilaForCausalLM`` is built for real and given the folder's weights: its rotary tables are
    non-persistent buffers computed in ``__init__``, which transformers 5's ``from_pretrained`` (built on the meta
    device) leaves as uninitialised memory (NaN logits)."""
    import torch

    if hf_class.__name__ != "AquilaForCausalLM":
        return hf_class.from_pretrained(hf_dir, dtype=dtype, use_safetensors=use_safetensors).eval()
    from aquila_npu.checkpoint.hf_io import HFReader
    from aquila_npu.weights.mapping import hf_names

    config = baai_rope_scaling(hf_class.config_class.from_pretrained(hf_dir), spec.rope_scaling_factor)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = hf_class(config)
    finally:
        torch.set_default_dtype(previous)
    reader = HFReader(hf_dir)
    model.load_state_dict({name: reader.get(name) for name in hf_names(reader.spec)}, strict=True)
    return model.eval()


def reference_class(hf_dir: str):
    """The Hugging Face class the ``--hf-dir`` config names, and how it was found: ``AquilaForCausalLM`` (BAAI's own
    code, the ``trust_remote_code`` class of BAAI's repos) from FlagAI's ``flagai`` package where it is installed,
    else transformers' ``LlamaForCausalLM`` (the same architecture, Aquila2's RMSNorm rounding aside in half
    precision). Returns (class, description)."""
    import importlib

    from transformers import LlamaForCausalLM

    with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    if "AquilaForCausalLM" in (cfg.get("architectures") or []) or cfg.get("model_type") == "aquila":
        try:
            module = importlib.import_module(AQUILA_CODE)
        except Exception as e:  # not installed, or its own imports fail: say so, compare with LLaMA
            return LlamaForCausalLM, (f"LlamaForCausalLM (transformers; {hf_dir} names AquilaForCausalLM, but "
                                      f"FlagAI's {AQUILA_CODE} does not import: {type(e).__name__})")
        return module.AquilaForCausalLM, f"AquilaForCausalLM (BAAI's code: {AQUILA_CODE})"
    return LlamaForCausalLM, "LlamaForCausalLM (transformers)"


def run(args) -> int:
    """``python -m aquila_npu.selfcheck`` without ``--report``: flags ``tp``, ``pp``, ``device``, ``dtype``, ``load``,
    ``hf_dir``, ``out``."""
    if bool(args.load) != bool(args.hf_dir):
        raise UsageError("--load and --hf-dir go together")
    import torch
    from megatron.core import parallel_state as ps

    from aquila_npu.checkpoint.load_model import build_stage, check_parallel_sizes, load_model_for_inference
    from aquila_npu.checkpoint.megatron_io import CheckpointInfo
    from aquila_npu.device.fused import FusedOps
    from aquila_npu.device.setup import resolve, setup
    from aquila_npu.inference.forward import forward_logits
    from aquila_npu.models.dtypes import DTYPES
    from aquila_npu.models.registry import get_model_spec
    from aquila_npu.parallel import initialize_model_parallel
    from aquila_npu.weights import seeded
    from aquila_npu.weights.mapping import Layout, hf_stage_to_mcore

    dtype_name = args.dtype or "fp32"
    info = CheckpointInfo.read(args.load) if args.load else None
    if info is not None:
        check_parallel_sizes(info, args.tp, args.pp)
        use_safetensors = _check_reference(args.hf_dir, args.load, info.spec)
    torch.set_num_threads(1)
    dtype = DTYPES[dtype_name]
    fused = FusedOps.all() if resolve(args.device) == "npu" else FusedOps()  # Ascend's kernels where they are
    if args.load:
        # Before setup(): transformers' from_pretrained builds non-persistent buffers (rotary inv_freq) wrongly under
        # the CPU redirection of torch.cuda / tensor factories.
        hf_class, reference = reference_class(args.hf_dir)
        hf_reference = load_reference(hf_class, args.hf_dir, info.spec, dtype, use_safetensors)
    else:
        reference = "LlamaForCausalLM (transformers)"
    dev = setup(args.device, fused)
    if info is not None:
        loaded = load_model_for_inference(info, dev, params_dtype=dtype)
        model, spec = loaded.model, loaded.spec
        hf = hf_reference.to(dev.torch_device)
    else:
        initialize_model_parallel(args.tp, args.pp)
        pp_rank, tp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
        spec = get_model_spec(MODEL)
        hf = seeded.hf_model(spec, SEED, dtype).to(dev.torch_device)
        layout = Layout(spec, args.tp, args.pp, make_vocab_size_divisible_by=8)
        shard = hf_stage_to_mcore(hf.state_dict().__getitem__, layout, pp_rank)[tp_rank]
        model, _ = build_stage(spec, layout, dev, shard, params_dtype=dtype, pp_rank=pp_rank)
    torch.manual_seed(1)
    tokens = torch.randint(3, spec.vocab_size, (2, 24), device=dev.torch_device)
    logits = forward_logits(model, tokens)
    if logits is None or ps.get_tensor_model_parallel_rank() != 0:
        return 0
    with torch.no_grad():
        ref = hf(tokens).logits.float()
    ours = logits.float()[..., : spec.vocab_size]
    npu = sys.modules.get("torch_npu")  # the tests' emulated torch_npu counts its op calls
    result = {"max_abs_diff": (ours - ref).abs().max().item(), "ref_abs_max": ref.abs().max().item(),
              "padded_vocab": logits.shape[-1],
              "argmax_agree": (ours.argmax(-1) == ref.argmax(-1)).float().mean().item(),
              "tp": args.tp, "pp": args.pp, "kernels": dev.kernels, "dtype": dtype_name, "reference": reference,
              "emulated_npu_calls": dict(getattr(npu, "calls", {})) if npu is not None else {},
              "tolerance": TOLERANCE[dtype_name]}
    result["ok"] = ok = result["max_abs_diff"] < result["tolerance"]
    if args.out:
        write_json(args.out, result, "the selfcheck result")
    print(f"aquila_npu selfcheck on {dev.name} (kernels {dev.kernels}), tp{args.tp}-pp{args.pp} {dtype_name}: "
          f"max |logits - HF| = {result['max_abs_diff']:.3g} -> {'OK' if ok else 'MISMATCH'} "
          f"(reference: {reference})", flush=True)
    print(json.dumps(result), flush=True)
    if not ok:
        raise CheckFailed(f"max |logits - HF| = {result['max_abs_diff']:.3g} is above the {dtype_name} tolerance "
                          f"{result['tolerance']:g} (tp{args.tp}-pp{args.pp} on {dev.name})")
    return 0
