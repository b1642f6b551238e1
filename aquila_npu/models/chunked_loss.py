"""The output layer and the cross-entropy over the vocabulary, a chunk of tokens at a time (``--loss-chunk-size``).

megatron-core's loss (``output_layer`` then ``vocab_parallel_cross_entropy``) holds the logits of the whole
micro-batch in the training dtype, their fp32 copy and the fp32 softmax it keeps for backward: at seq 4096 and the
100,008-token vocabulary 0.8 + 1.6 GB per micro-batch in bf16. Here each chunk of ``chunk`` tokens goes through the
output matmul, the (vocabulary-parallel) cross-entropy and its gradient in fp32 before the next chunk is computed; the
forward keeps only the gradients, in the training dtype: d(hidden) [n, h] and d(weight) [V, h] (accumulated over the
chunks in fp32; the size of the weight, whatever the sequence length). The matmuls are those of the plain path (one forward and
two backward products per token); nothing is recomputed.

The gradient is computed in the forward, so it assumes what ``aquila_npu.training.step.masked_loss`` does with the
per-token loss: the loss is summed over the tokens whose ``loss_mask`` is 1, times a scalar (megatron-core's
``output_tensor_grad``, the fp16 loss scale). d(hidden) is exact for any per-token gradient; d(weight) takes that
scalar as sum(grad * mask) / sum(mask), exact under this contract (tests/test_step_switches.py compares losses and
gradients with the plain path).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel

from aquila_npu.compat.megatron_core import HiddenStateLoss


def _all_reduce(t: torch.Tensor, op, group) -> None:
    if group is not None:
        torch.distributed.all_reduce(t, op=op, group=group)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy [n] (fp32) of ``hidden [n, h] @ weight[V_local, h]^T`` against ``labels [n]`` (global
    vocabulary ids; this rank holds ids ``vocab_start ..`` + V_local), ``chunk`` rows at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, mask, chunk: int, group, vocab_start: int):
        with torch.profiler.record_function("aquila:loss"):
            n, vp = hidden.shape[0], weight.shape[0]
            want_dh, want_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            losses = torch.empty(n, dtype=torch.float32, device=hidden.device)
            dh = torch.empty_like(hidden) if want_dh else None
            dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_dw else None
            max_op, sum_op = torch.distributed.ReduceOp.MAX, torch.distributed.ReduceOp.SUM
            for start in range(0, n, chunk):
                h = hidden[start:start + chunk]
                logits = torch.matmul(h, weight.t()).float()  # [c, V_local]: the only logits that exist
                top = logits.max(dim=-1).values
                _all_reduce(top, max_op, group)
                logits.sub_(top.unsqueeze(-1))
                local = labels[start:start + chunk] - vocab_start
                inside = (local >= 0) & (local < vp)
                idx = torch.where(inside, local, torch.zeros_like(local)).unsqueeze(-1)
                target = logits.gather(-1, idx).squeeze(-1) * inside
                _all_reduce(target, sum_op, group)
                logits.exp_()
                sum_exp = logits.sum(dim=-1)
                _all_reduce(sum_exp, sum_op, group)
                losses[start:start + chunk] = sum_exp.log() - target
                if want_dh or want_dw:
                    logits.div_(sum_exp.unsqueeze(-1))  # softmax
                    logits.scatter_add_(-1, idx, -inside.to(logits.dtype).unsqueeze(-1))  # - one-hot (this rank's)
                    d = logits.to(hidden.dtype)
                    if want_dh:
                        dh[start:start + chunk] = torch.matmul(d, weight)
                    if want_dw:
                        dw.add_(torch.matmul(d.t(), h * mask[start:start + chunk].unsqueeze(-1).to(h.dtype)))
            if dw is not None:  # accumulated over the chunks in fp32, kept in the weight's dtype (as its gradient is)
                dw = dw.to(weight.dtype)
            ctx.save_for_backward(dh, dw, mask)
            ctx.weight_dtype = weight.dtype
        return losses

    @staticmethod
    def backward(ctx, grad):
        with torch.profiler.record_function("aquila:loss"):
            dh, dw, mask = ctx.saved_tensors
            grad = grad.float()
            grad_hidden = grad_weight = None
            if dh is not None:
                grad_hidden = dh * grad.unsqueeze(-1).to(dh.dtype)
            if dw is not None:
                scale = (grad * mask).sum() / (mask * mask).sum().clamp_min(1e-30)  # grad = scale * mask
                grad_weight = (dw.float() * scale).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          loss_mask: Optional[torch.Tensor], chunk: int, sequence_parallel: bool) -> torch.Tensor:
    """Per-token loss [b, s] from the last hidden states [s, b, h] (sequence-sharded with ``sequence_parallel``),
    the output weight (this rank's vocabulary rows), labels [b, s]."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
    if sequence_parallel and tp > 1:  # all-gather the sequence; backward reduce-scatters d(hidden)
        hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
    elif tp > 1:  # backward all-reduces d(hidden) over the vocabulary shards
        hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden)
    s, b, h = hidden.shape
    labels_sb = labels.t().reshape(-1)  # the [s, b] order of the hidden states
    mask = (torch.ones_like(labels_sb, dtype=torch.float32) if loss_mask is None
            else loss_mask.t().reshape(-1).float())
    start = parallel_state.get_tensor_model_parallel_rank() * weight.shape[0]
    loss = ChunkedLinearCrossEntropy.apply(hidden.reshape(s * b, h), weight, labels_sb, mask, chunk, group, start)
    return loss.view(s, b).t()


class ChunkedLossGPTModel(HiddenStateLoss, GPTModel):
    """megatron-core's GPTModel whose training loss is ``chunked_cross_entropy`` (``loss_chunk_size`` tokens at a
    time); evaluation, generation and everything else are GPTModel's own."""

    def __init__(self, *args, loss_chunk_size: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_chunk_size = loss_chunk_size

    def loss_from_hidden(self, hidden_states, weight, labels, loss_mask):
        return chunked_cross_entropy(hidden_states, weight, labels, loss_mask, self.loss_chunk_size,
                                     self.config.sequence_parallel)
