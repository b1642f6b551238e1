"""Modules built on Ascend's fused kernels (torch_npu). Same parameters as the plain modules they replace.

``torch_npu`` is imported when a module is built or called, never when this file is imported, so the npu backend's
code can be exercised on a CPU with the tests' emulator of the torch_npu ops. Every kernel argument used
here exists in the oldest torch_npu we support (2.6.0); tests/test_npu_emulator.py checks that against its wheel.
Doc lines cited below are torch_npu 2.13.0's ``torch_npu/_op_plugin_docs.py``.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import warnings
from typing import Optional

import torch
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.tensor_parallel.mappings import reduce_scatter_to_sequence_parallel_region
from torch import Tensor

from aquila_npu.compat import torch as compat_torch
from aquila_npu.compat.megatron_core import LinearProductSeam
from aquila_npu.device.npu_limits import COMPRESSED_MASK
from aquila_npu.device.torch_modules import RMSNorm, SDPAAttention, shared_causal_mask
from aquila_npu.errors import FusedKernelUnavailable, UsageError



def torch_npu():
    return importlib.import_module("torch_npu")


class NpuRMSNorm(RMSNorm):
    """``torch_npu.npu_rms_norm``; it returns ``(y, rstd)``."""

    def forward(self, x: Tensor) -> Tensor:
        return torch_npu().npu_rms_norm(x, self.weight, epsilon=self.eps)[0]


class NpuSwiGLU(torch.nn.Module):
    """``torch_npu.npu_swiglu`` on megatron-core's packed [gate | up] fc1 output: silu(gate) * up."""

    def __init__(self, config=None, **unused):
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return torch_npu().npu_swiglu(x, dim=-1)


def npu_rope(t: Tensor, freqs: Tensor) -> Tensor:
    """Rotary embedding with ``torch_npu.npu_rotary_mul`` (rotate-half). t: [s, b, n, d]; freqs: [s, 1, 1, d]."""
    rot_dim = freqs.shape[-1]
    t_rot, t_pass = t[..., :rot_dim], t[..., rot_dim:]
    cos, sin = freqs.cos().to(t.dtype), freqs.sin().to(t.dtype)
    # megatron-core's q/k are strided views of the fused QKV output; the kernel's layouts (SBND here) are memory
    # layouts (docs 3550)
    out = torch_npu().npu_rotary_mul(t_rot.contiguous(), cos.contiguous(), sin.contiguous())
    return out if t_pass.shape[-1] == 0 else torch.cat((out, t_pass), dim=-1)


def _full_mask(mask: Tensor, b: int, sq: int, sk: int) -> Tensor:
    """``mask`` in a shape both attention kernels take ([sq, sk] or [b|1, 1, sq, sk]), contiguous."""
    if not (mask.dim() == 2 or (mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[0] in (1, b))) \
            or tuple(mask.shape[-2:]) != (sq, sk):
        mask = mask.expand(b, 1, sq, sk)
    return mask.contiguous()


@functools.lru_cache(maxsize=None)
def _warn_plain_inference(reason: str) -> None:
    warnings.warn(f"--use-flash-attn: {reason}; inference attention runs the plain path (training keeps "
                  "npu_fusion_attention)", stacklevel=2)


class NpuFlashAttention(SDPAAttention):
    """Core attention on Ascend's flash-attention kernels, megatron-core's ``sbhd`` tensors in and out.

    Training (module in train mode, validation included): ``npu_fusion_attention`` in the ``SBH`` layout, which the
    docs reserve for training (1674). Causal self-attention uses the kernel's causal sparsity: up to 2048 tokens
    sparse_mode 0 with a cached [S, S] lower-triangular mask and next_tockens=0 (1638; the docs advise the full mask
    below 2048x2048, 1623), beyond that sparse_mode 2 with the cached 2048x2048 compressed mask (1643), as MindSpeed
    does. Any other mask (padding) is passed whole with the full token window.

    Inference (eval mode: generation with megatron-core's static KV cache, evaluation's full-sequence scoring):
    ``npu_fused_infer_attention_score`` (8151: inference; one op for the prompt, Q_S > 1, and for each decoded token,
    Q_S == 1) in the ``BSND`` layout; the causal prompt uses sparse_mode 3 with the compressed mask (8121, 8214),
    decoding steps attend to the whole cache unmasked, as megatron-core passes them. That kernel takes float16 and
    bfloat16 only (8065) and a head dim that is a multiple of 16 (8210): a model outside its limits (fp32 inference
    with --use-flash-attn) runs the plain attention of ``SDPAAttention`` and says so once (a warning).

    Packed documents (training, megatron-core's ``thd``): one ``npu_fusion_attention`` call in the varlen ``TND``
    layout (1607), ``actual_seq_qlen`` / ``actual_seq_kvlen`` the documents' cumulative lengths (1619-1622), causal
    within each by sparse_mode 3 with the 2048x2048 compressed mask (1644), at most 2048 documents per call (1680,
    1694), as MindSpeed-LLM's pack fine-tuning calls it.

    GQA: both kernels take fewer K/V heads than query heads, so K/V are never repeated in memory.
    """

    MAX_DOCUMENTS = 2048  # varlen B: 1~2K (docs 1680), actual_seq_qlen's length 1~2K (1694)

    def attend(self, query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor], implicit_causal: bool,
               dropout_p: float) -> Tensor:
        if self.training:
            return self._train(query, key, value, mask, implicit_causal, dropout_p)
        reason = self.inference_kernel_refuses(query.dtype)
        if reason:
            _warn_plain_inference(reason)
            return super().attend(query, key, value, mask, implicit_causal, dropout_p)
        return self._infer(query, key, value, mask, implicit_causal)

    def attend_documents(self, query: Tensor, key: Tensor, value: Tensor, lengths, dropout_p: float) -> Tensor:
        if not self.training:  # the training kernel only (1674): inference never packs, but stay correct
            return super().attend_documents(query, key, value, lengths, dropout_p)
        t, np_, hn = query.shape
        out, at = [], 0
        for first in range(0, len(lengths), self.MAX_DOCUMENTS):
            part = lengths[first:first + self.MAX_DOCUMENTS]
            n = sum(part)
            cumulative = list(itertools.accumulate(part))
            q, k, v = (x[at:at + n].contiguous() for x in (query, key, value))  # TND: [T, N, D]
            out.append(torch_npu().npu_fusion_attention(
                q, k, v, np_, "TND", atten_mask=shared_causal_mask(COMPRESSED_MASK, COMPRESSED_MASK, query.device),
                scale=self.scale, keep_prob=1.0 - dropout_p, actual_seq_qlen=cumulative,
                actual_seq_kvlen=cumulative, sparse_mode=3)[0])
            at += n
        return torch.cat(out).reshape(t, np_ * hn)

    def inference_kernel_refuses(self, dtype: torch.dtype) -> Optional[str]:
        """Why ``npu_fused_infer_attention_score`` cannot run this layer in ``dtype`` (None: it can)."""
        d, n = self.head_dim, self.num_heads
        if dtype not in (torch.float16, torch.bfloat16):
            return f"npu_fused_infer_attention_score takes float16/bfloat16, not {dtype} (_op_plugin_docs.py:8065)"
        if d % 16 or d > 512 or n > 256 or n // self.num_groups > 64:
            return (f"npu_fused_infer_attention_score needs a head dim that is a multiple of 16 and <= 512, <= 256 "
                    f"heads and <= 64 query heads per key/value head, not D={d}, N={n} (_op_plugin_docs.py:8204, "
                    "8210, 8116)")
        return None

    def _train(self, query, key, value, mask, implicit_causal, dropout_p):
        sq, b, np_, _ = query.shape
        sk = key.shape[0]
        if implicit_causal and sq > COMPRESSED_MASK:
            sparse = dict(atten_mask=shared_causal_mask(COMPRESSED_MASK, COMPRESSED_MASK, query.device), sparse_mode=2)
        elif implicit_causal:
            sparse = dict(atten_mask=shared_causal_mask(sq, sq, query.device), sparse_mode=0, pre_tockens=sq,
                          next_tockens=0)
        else:
            sparse = dict(atten_mask=None if mask is None else _full_mask(mask, b, sq, sk), sparse_mode=0)
        return torch_npu().npu_fusion_attention(
            query.reshape(sq, b, -1).contiguous(), key.reshape(sk, b, -1).contiguous(),
            value.reshape(sk, b, -1).contiguous(), np_, "SBH", scale=self.scale, keep_prob=1.0 - dropout_p,
            **sparse)[0]

    def _infer(self, query, key, value, mask, implicit_causal):
        sq, b, np_, hn = query.shape
        sk = key.shape[0]
        q, k, v = (t.transpose(0, 1).contiguous() for t in (query, key, value))  # BSND
        extra = {}
        if implicit_causal and sq > 1:
            extra = dict(atten_mask=shared_causal_mask(COMPRESSED_MASK, COMPRESSED_MASK, query.device), sparse_mode=3)
        elif mask is not None:
            extra = dict(atten_mask=_full_mask(mask, b, sq, sk), sparse_mode=0)
        out = torch_npu().npu_fused_infer_attention_score(
            q, k, v, num_heads=np_, num_key_value_heads=key.shape[2], scale=self.scale, input_layout="BSND",
            **extra)[0]
        return out.transpose(0, 1).reshape(sq, b, np_ * hn)


# --------------------------------------------------------------------------------------------------------------- MC2
def hccl_comm_name(group) -> str:
    """The name torch_npu's MC2 kernels take for ``group`` (their ``hcom``): its HCCL communicator's, asked with
    this rank's global rank (docs 10240)."""
    rank = torch.distributed.get_global_rank(group, torch.distributed.get_rank(group))
    return compat_torch.hccl_comm_name(group, rank)


def check_mc2(config, tp: int, inner_sizes) -> None:
    """--use-mc2 needs what the MC2 kernels need: sequence parallelism over 2, 4 or 8 ranks (10191), float16 or
    bfloat16 (10188) and every matmul's inner size in [256, 65535) (10188, 10431)."""
    if not config.sequence_parallel or tp not in (2, 4, 8):
        raise UsageError(f"--use-mc2 fuses the all-gather / reduce-scatter of sequence parallelism into the matmuls: "
                         f"it needs --sequence-parallel and --tensor-model-parallel-size 2, 4 or 8 (here "
                         f"{'with' if config.sequence_parallel else 'without'} --sequence-parallel, tp {tp}); "
                         "generation and evaluation have no sequence parallelism")
    if config.params_dtype not in (torch.float16, torch.bfloat16):
        raise FusedKernelUnavailable("--use-mc2: torch_npu's MC2 kernels take float16/bfloat16 only "
                                     "(_op_plugin_docs.py:10188): add --bf16 or --fp16, or drop --use-mc2")
    bad = [k for k in inner_sizes if not 256 <= k < 65535]
    if bad:
        raise FusedKernelUnavailable(f"--use-mc2: torch_npu's MC2 kernels need matmul inner sizes in [256, 65535) "
                                     f"(_op_plugin_docs.py:10188), this model has {bad[0]} at tp {tp}: drop "
                                     "--use-mc2")


class _AllGatherMatmul(torch.autograd.Function):
    """y = all_gather(x) @ w^T in one kernel: x [s/tp, b, k] (this rank's tokens), w [n/tp, k] -> y [s, b, n/tp].
    Backward: dx = reduce_scatter(dy @ w) (megatron-core's collective), dw = dy^T @ all_gather(x), the gathered input
    the kernel returned in the forward."""

    @staticmethod
    def forward(ctx, x, weight, group, hcom):
        s, b, k = x.shape
        world = torch.distributed.get_world_size(group)
        out, gathered = torch_npu().npu_all_gather_base_mm(x.reshape(s * b, k).contiguous(), weight.t(), hcom, world,
                                                           gather_index=0, gather_output=True, comm_turn=0)
        ctx.save_for_backward(gathered, weight)
        ctx.group = group
        return out.view(s * world, b, -1)

    @staticmethod
    def backward(ctx, grad):
        gathered, weight = ctx.saved_tensors
        s, b, n = grad.shape
        g = grad.reshape(s * b, n)
        dx = reduce_scatter_to_sequence_parallel_region(torch.matmul(g, weight).view(s, b, -1), group=ctx.group)
        dw = torch.matmul(g.t(), gathered) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


class _MatmulReduceScatter(torch.autograd.Function):
    """y = reduce_scatter(x @ w^T) in one kernel: x [s, b, k/tp], w [n, k/tp] -> y [s/tp, b, n] (this rank's tokens).
    Backward: dx = all_gather(dy) @ w in one kernel, which also returns all_gather(dy) for dw = all_gather(dy)^T @ x."""

    @staticmethod
    def forward(ctx, x, weight, group, hcom):
        s, b, k = x.shape
        world = torch.distributed.get_world_size(group)
        x2d = x.reshape(s * b, k).contiguous()
        out = torch_npu().npu_mm_reduce_scatter_base(x2d, weight.t(), hcom, world, reduce_op="sum", comm_turn=0)
        ctx.save_for_backward(x2d, weight)
        ctx.hcom, ctx.world, ctx.shape = hcom, world, (s, b)
        return out.view(s // world, b, -1)

    @staticmethod
    def backward(ctx, grad):
        x2d, weight = ctx.saved_tensors
        s, b = ctx.shape
        g = grad.reshape(-1, grad.shape[-1]).contiguous()
        dx, gathered = torch_npu().npu_all_gather_base_mm(g, weight, ctx.hcom, ctx.world, gather_index=0,
                                                          gather_output=True, comm_turn=0)
        dw = torch.matmul(gathered.t(), x2d) if ctx.needs_input_grad[1] else None
        return dx.view(s, b, -1), dw, None, None


class _Mc2:
    """What both MC2 linears share: the communicator name of the tensor-parallel group, asked once."""

    _hcom: Optional[str] = None

    def hcom(self) -> str:
        if self._hcom is None:
            self._hcom = hccl_comm_name(self.tp_group)
        return self._hcom


class Mc2ColumnParallelLinear(_Mc2, LinearProductSeam, ColumnParallelLinear):
    """--use-mc2: megatron-core's column-parallel linear whose sequence-parallel all-gather runs inside the matmul
    kernel (``torch_npu.npu_all_gather_base_mm``). Same parameters; a bias is added after the kernel (10193)."""

    def __init__(self, input_size, output_size, **kwargs):
        super().__init__(input_size, output_size, **kwargs)
        check_mc2(self.config, self.tp_group.size(), (input_size,))

    def linear_product(self, original, input, weight, *args, bias=None, sequence_parallel=False, **kwargs):
        if not sequence_parallel:  # expert layers only; check_mc2 refused a model without sequence parallelism
            return original(input, weight, *args, bias=bias, sequence_parallel=sequence_parallel, **kwargs)
        out = _AllGatherMatmul.apply(input, weight, self.tp_group, self.hcom())
        return out if bias is None else out + bias


class Mc2RowParallelLinear(_Mc2, RowParallelLinear):
    """--use-mc2: megatron-core's row-parallel linear whose sequence-parallel reduce-scatter runs inside the matmul
    kernel (``torch_npu.npu_mm_reduce_scatter_base``). Same parameters; a bias is added after the kernel (10415)."""

    def __init__(self, input_size, output_size, **kwargs):
        super().__init__(input_size, output_size, **kwargs)
        check_mc2(self.config, self.tp_group.size(), (self.input_size_per_partition, output_size))

    def forward(self, input_):
        if not self.sequence_parallel or self.explicit_expert_comm:
            return super().forward(input_)
        out = _MatmulReduceScatter.apply(input_, self.weight, self.tp_group, self.hcom())
        if self.skip_bias_add:
            return out, self.bias
        return (out if self.bias is None else out + self.bias), None
