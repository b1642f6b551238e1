"""Loss drift, located: two runs' per-layer statistics (``pretrain --layer-stats FILE``, training/layer_stats.py)
compared iteration by iteration and layer by layer, naming the first iteration and the first layer where they part
beyond the tolerance of the less precise dtype (``python -m aquila_npu.selfcheck --compare RUN_A RUN_B``).

Within an iteration the forward comes first (the embedding's output, each layer's input and output in layer order,
the final norm, the logits), then the backward (the gradients from the output layer down to the embedding), as the
run computed them: the first statistic out of tolerance is where the runs part. A layer whose input agrees and whose
output does not computes differently itself (a kernel, its dtype, its tensor-parallel split); a layer whose input
already differs inherits the difference from below.

Tolerances (relative difference of two norms): fp32 1e-4, fp16 5e-3, bf16 2e-2 (the selfcheck's training
tolerance in bf16, aquila_npu.checks.training; fp16 and fp32 those of its op checks and logits check). MindSpeed-LLM's
precision guide compares the same three things: the first step's loss, the drift over many steps, and layer by layer
where they part. Pure Python: no torch.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import List, Optional, Tuple

from aquila_npu.errors import CheckFailed, DataError, UsageError

TOLERANCE = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 2e-2}
DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}  # torch's names, as older files wrote them
SAME_RUN = ("model", "num_layers", "seq_length", "global_batch_size", "seed", "data", "first_iteration")
# a layer's parameters in the order its backward reaches them (the MLP's last linear first)
BACKWARD_IN_LAYER = ("mlp.linear_fc2", "mlp.linear_fc1", "pre_mlp_layernorm", "self_attention.linear_proj",
                     "self_attention.linear_qkv", "input_layernorm")


def read(path: str, flag: str) -> Tuple[dict, List[dict]]:
    """(meta, iterations) of a --layer-stats file; a bad file is one line naming it."""
    if not os.path.isfile(path):
        raise DataError(f"{flag} {path}: no such file (write one with aquila_npu.pretrain --layer-stats {path})")
    meta, rows = None, []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{flag} {path}: line {n} is not JSON (not a --layer-stats file)") from None
            if "meta" in rec:
                meta = rec["meta"]
            elif "iteration" in rec and "norms" in rec:
                rows.append(rec)
    if meta is None or not rows:
        raise DataError(f"{flag} {path}: no {'run description' if meta is None else 'iteration'} in it (written by "
                        "aquila_npu.pretrain --layer-stats? a run that stopped before its first iteration?)")
    return meta, rows


def order(keys, num_layers: int) -> List[str]:
    """The statistics in the order the run computed them: forward, then backward."""
    forward = ["embedding.output"]
    for i in range(1, num_layers + 1):
        forward += [f"layer{i}.input", f"layer{i}.output"]
    forward += ["final_norm.output", "logits"]
    backward = ["grad.output_layer.weight", "grad.decoder.final_layernorm.weight"]
    for i in reversed(range(num_layers)):
        backward += [f"grad.decoder.layers.{i}.{p}.weight" for p in BACKWARD_IN_LAYER]
    backward.append("grad.embedding.word_embeddings.weight")
    known = forward + backward
    keys = set(keys)
    return [k for k in known if k in keys] + sorted(keys - set(known))


def describe(key: str) -> str:
    """Where a statistic lives, in the model's words."""
    m = re.fullmatch(r"layer(\d+)\.(input|output)", key)
    if m:
        return f"layer {m.group(1)} (decoder.layers.{int(m.group(1)) - 1}) {m.group(2)}"
    m = re.fullmatch(r"grad\.decoder\.layers\.(\d+)\.(.+)", key)
    if m:
        return f"the gradient of decoder.layers.{m.group(1)}.{m.group(2)} (layer {int(m.group(1)) + 1}'s backward)"
    if key.startswith("grad."):
        return f"the gradient of {key[5:]}"
    return {"embedding.output": "the embedding's output", "final_norm.output": "the final norm's output",
            "logits": "the logits"}.get(key, key)


def relative(a: float, b: float) -> float:
    if a == b:
        return 0.0
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    return abs(a - b) / max(abs(a), abs(b), 1e-30)


def _tolerance(meta: dict) -> float:
    """The dtype's tolerance; an unknown dtype gets the loosest (bf16's)."""
    dtype = meta.get("dtype")
    return TOLERANCE.get(DTYPE_NAMES.get(dtype, dtype), TOLERANCE["bf16"])


def compare(a: Tuple[dict, List[dict]], b: Tuple[dict, List[dict]], tolerance: Optional[float] = None) -> dict:
    """Where two runs part (or that they agree): the first iteration, statistic and layer out of tolerance."""
    (ma, ra), (mb, rb) = a, b
    tol = tolerance if tolerance is not None else max(_tolerance(ma), _tolerance(mb))
    by_it = {r["iteration"]: r for r in rb}
    iterations = [r for r in ra if r["iteration"] in by_it]
    result = {"tolerance": tol, "iterations": [], "parted": None}
    for ia in iterations:
        ib = by_it[ia["iteration"]]
        keys = order(set(ia["norms"]) & set(ib["norms"]), ma["num_layers"])
        rels = {k: relative(ia["norms"][k], ib["norms"][k]) for k in keys}
        worst = max(((rels[k], k) for k in keys), default=(0.0, None))
        loss = relative(ia["loss"], ib["loss"])
        result["iterations"].append({"iteration": ia["iteration"], "loss_a": ia["loss"], "loss_b": ib["loss"],
                                     "loss_rel": loss, "max_rel": worst[0], "max_at": worst[1],
                                     "compared": len(keys)})
        if result["parted"] is None:
            first = next((k for k in keys if rels[k] > tol), None)  # (keys: the model's order)
            if first is not None:
                result["parted"] = _parted(ia, ib, first, rels[first], keys)
    return result


def _parted(ia: dict, ib: dict, key: str, rel: float, keys: List[str]) -> dict:
    out = {"iteration": ia["iteration"], "key": key, "where": describe(key), "a": ia["norms"][key],
           "b": ib["norms"][key], "rel": rel, "layer": None, "cause": ""}
    m = re.fullmatch(r"layer(\d+)\.output", key)
    if m:
        layer = int(m.group(1))
        inp = f"layer{layer}.input"
        out["layer"] = layer
        if inp in keys:
            out["cause"] = (f"its input agrees ({relative(ia['norms'][inp], ib['norms'][inp]):.1e}): layer {layer}'s "
                            "own computation differs (a kernel, the dtype, the tensor-parallel split)")
    m = re.fullmatch(r"layer(\d+)\.input", key)
    if m:
        out["layer"] = int(m.group(1))
        out["cause"] = "the input differs already (the embedding or the layers below)"
    m = re.fullmatch(r"grad\.decoder\.layers\.(\d+)\..+", key)
    if m:
        out["layer"] = int(m.group(1)) + 1
        out["cause"] = "the forward agrees: the backward of this layer differs"
    return out


def _label(meta: dict) -> str:
    return f"{meta.get('device')} {meta.get('dtype')} tp{meta.get('tp')} pp{meta.get('pp')} dp{meta.get('dp')}"


def run(args) -> int:
    path_a, path_b = args.compare
    a, b = read(path_a, "--compare"), read(path_b, "--compare")
    for field in SAME_RUN:
        if a[0].get(field) != b[0].get(field):
            raise UsageError(f"--compare: {path_a} and {path_b} are not runs of the same model and data "
                             f"({field}: {a[0].get(field)} vs {b[0].get(field)}): compare runs with the same --load, "
                             "data, --seed, --seq-length and --global-batch-size")
    result = compare(a, b, args.tolerance)
    va, vb = a[0].get("padded_vocab"), b[0].get("padded_vocab")
    if va and vb and va != vb:  # megatron-core pads to a multiple of --make-vocab-size-divisible-by x tp
        print(f"note: the vocabulary is padded to {va} rows in A and {vb} in B: the padded logits take part in the "
              "softmax, so the losses and gradients differ a little; give the runs a --make-vocab-size-divisible-by "
              "that pads both alike")
    print(f"A: {path_a} ({_label(a[0])}; {a[0].get('kernels', '')})")
    print(f"B: {path_b} ({_label(b[0])}; {b[0].get('kernels', '')})")
    print(f"tolerance {result['tolerance']:g} (relative, of each norm)")
    for it in result["iterations"]:
        print(f"iteration {it['iteration']}: loss {it['loss_a']:.6f} vs {it['loss_b']:.6f} "
              f"({it['loss_rel']:.1e}); {it['compared']} norms, largest difference {it['max_rel']:.1e} at "
              f"{describe(it['max_at']) if it['max_at'] else '-'}")
    if args.out:
        from aquila_npu.outputs.files import write_json

        write_json(args.out, {"a": path_a, "b": path_b, **result}, "the comparison", indent=1)
    p = result["parted"]
    if p is None:
        print(f"the runs agree within {result['tolerance']:g} at every layer of {len(result['iterations'])} "
              "iteration(s)")
        return 0
    raise CheckFailed(f"the runs part at iteration {p['iteration']}, {p['where']}: {p['a']:.6g} (A) vs {p['b']:.6g} "
                      f"(B), {p['rel']:.1e} apart > {result['tolerance']:g}" + (f"; {p['cause']}" if p['cause'] else ""))
