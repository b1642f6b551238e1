"""Named Aquila2 architectures with their published shapes.

Sources (the HF ``config.json`` of each model; FlagAI ``flagai/model/aquila2/configuration_aquila.py`` defaults agree):

* ``aquila2-7b`` / ``aquilachat2-7b``: BAAI/Aquila2-7B (Oct-2023 revision), BAAI/AquilaChat2-7B: hidden_size 4096,
  intermediate_size 11008, num_hidden_layers 32, num_attention_heads 32, num_key_value_heads not set (= 32),
  vocab_size 100008, max_position_embeddings 2048, rms_norm_eps 1e-5, rope_theta not set (10000),
  tie_word_embeddings false.
* ``aquila2-34b`` / ``aquilachat2-34b``: BAAI/Aquila2-34B (revision 356733c), BAAI/AquilaChat2-34B: hidden_size 6144,
  intermediate_size 24576, num_hidden_layers 60, num_attention_heads 48, num_key_value_heads 8, vocab_size 100008,
  max_position_embeddings 4096, rms_norm_eps 1e-5, rope_theta not set (10000), tie_word_embeddings false.
* ``aquilachat2-7b-16k`` / ``aquilachat2-34b-16k``: as the chat models with ``rope_scaling {linear, 8.0}`` /
  ``{linear, 4.0}`` and max_position_embeddings 16384.
* ``aquila2-7b-2406`` / ``aquila2-34b-2406``: BAAI's 2024-06-06 re-release of the base models: vocab_size 143973,
  max_position_embeddings 8192, rope_theta 1e6, otherwise as the original.

The ModelLink figures (BoolQ 77.8% / 88.0%, throughput) belong to the original 100008-vocab models, the default.

The first generation (``generation=1``), FlagAI's own models (seed 001: FlagAI's Aquila-7B README), named as FlagAI's
``AutoLoader`` names them: ``aquila-7b``, ``aquilachat-7b``, ``aquilacode-7b-nv``, ``aquilacode-7b-ts``. FlagAI's
config.json (``examples/Aquila/Aquila-sql/metric/configs/flagai-7b/params.json`` in FlagAI's repository): dim 4096,
multiple_of 256 (SwiGLU size 11008), n_heads 32, n_layers 32, norm_eps 1e-5, vocab_size 100008, max_seq_len 2048;
the tokenizer is FlagAI's 100k BPE (``gpt2_new_100k``, the same files as Aquila2's). In Hugging Face terms the shapes
of Aquila2-7B; FlagAI's own layout keeps the query / key rows in interleaved RoPE order
(``aquila_npu.weights.flagai``), which the converter reorders.

``reference``: the model code each entry is checked against (tests/test_flagai_parity.py, one test per entry).

The second family (issue 25, ``family="baichuan"``): Baichuan2 (seed 004: Baichuan2's README), from the
``config.json`` of baichuan-inc/Baichuan2-{7B,13B}-{Base,Chat}: 7B hidden_size 4096, intermediate_size 11008,
num_hidden_layers 32, num_attention_heads 32 (no key/value-head field: multi-head), RoPE (theta 10000);
13B hidden_size 5120, intermediate_size 13696, 40 layers, 40 heads, ALiBi (no RoPE); both vocab_size 125696,
max positions (``model_max_length``) 4096, rms_norm_eps 1e-6, bos 1 / eos 2 / pad 0, bfloat16, untied. Their
attention weight is one fused ``W_pack`` ([q; k; v], ``aquila_npu.weights.table.BAICHUAN_TABLE``) and their output
layer is ``NormHead`` (each vocabulary row of the weight normalised to unit length in every forward:
``aquila_npu.models.norm_head``). Debug shapes: ``baichuan2-tiny`` (7B-shaped: RoPE, NormHead) and
``baichuan2-tiny-alibi`` (13B-shaped). The 7B math is Llama's once ``W_pack`` is split and the output rows
normalised, which is what tests/test_baichuan2.py checks against transformers' ``LlamaForCausalLM``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of one Aquila2 model, in Hugging Face terms."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling_factor: Optional[float] = None  # linear position interpolation (the 16K chat models)
    tie_word_embeddings: bool = False
    bos_token_id: int = 100006
    eos_token_id: int = 100007
    pad_token_id: int = 0
    torch_dtype: str = "float16"
    source: str = ""
    # The AquilaChat2 conversation template FlagAI's predict.py uses for this model (aquila_npu.data.templates);
    # None: not a chat model of the registry (generation's --chat then uses FlagAI's default, aquila-chat).
    chat_template: Optional[str] = None
    # 2: Aquila2 (BAAI's Hugging Face AquilaForCausalLM); 1: FlagAI's first-generation Aquila (AQUILAModel).
    generation: int = 2
    # The model family: "aquila" (BAAI's Aquila / Aquila2, the Llama tensor names) or "baichuan" (Baichuan2: the
    # fused W_pack attention weight, model_type "baichuan"); the weight table follows it (weights.table.table_for).
    family: str = "aquila"
    # "rope" (rotate-half RoPE, every Aquila and Baichuan2-7B) or "alibi" (Baichuan2-13B: ALiBi biases, no RoPE).
    position_embedding: str = "rope"
    # "linear" (a plain output matmul) or "normhead" (Baichuan2's NormHead: rows normalised in every forward).
    output_layer: str = "linear"

    @property
    def is_aquila(self) -> bool:
        """BAAI's Aquila family (checked against FlagAI's model code); False for the other families (Baichuan2)."""
        return self.family == "aquila"

    @property
    def reference(self) -> str:
        """The model code this entry is checked against: BAAI's own, as the ``flagai`` package ships it."""
        if self.family == "baichuan":
            return ("transformers LlamaForCausalLM on W_pack split and NormHead rows normalised "
                    "(Baichuan2 modeling_baichuan.py's math)")
        if self.generation == 1:
            return "FlagAI AQUILAModel (flagai/model/aquila_model.py)"
        return "FlagAI AquilaForCausalLM (flagai/model/aquila2/modeling_aquila.py)"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def num_parameters(self, padded_vocab_size: Optional[int] = None) -> int:
        """Parameter count of the model (the HF checkpoint's, unless a padded vocab is given)."""
        v = padded_vocab_size or self.vocab_size
        h, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * h + 2 * h * self.num_key_value_heads * d + h * h  # q, k, v, o
        mlp = 3 * h * f  # gate, up, down
        per_layer = attn + mlp + 2 * h  # two RMSNorm weights
        embeddings = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + h  # + final norm

    def replace(self, **changes) -> "ModelSpec":
        return dataclasses.replace(self, **changes)

    def to_hf_config(self) -> dict:
        """The fields of a HF LlamaForCausalLM ``config.json`` for this architecture (Baichuan2: its own
        ``BaichuanForCausalLM`` config, ``baichuan_hf_config``)."""
        if self.family == "baichuan":
            return self.baichuan_hf_config()
        cfg = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.torch_dtype,
        }
        if self.rope_scaling_factor:
            cfg["rope_scaling"] = {"type": "linear", "rope_type": "linear", "factor": self.rope_scaling_factor}
        return cfg

    def baichuan_hf_config(self) -> dict:
        """Baichuan2's ``config.json`` fields (its own keys: ``model_max_length``, no key/value-head count), plus
        ``position_embedding_type`` / ``norm_head``, which Baichuan's code ignores and ``models.hf_config`` reads
        first (without them it uses vLLM's rules: hidden size 4096 is RoPE, vocabulary 125696 is NormHead)."""
        return {
            "architectures": ["BaichuanForCausalLM"],
            "model_type": "baichuan",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_position_embeddings,
            "model_max_length": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.torch_dtype,
            "tokenizer_class": "BaichuanTokenizer",
            "position_embedding_type": self.position_embedding,
            "norm_head": self.output_layer == "normhead",
        }


_7B = dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_attention_heads=32, num_key_value_heads=32,
           vocab_size=100008, max_position_embeddings=2048, torch_dtype="float16")
_34B = dict(hidden_size=6144, intermediate_size=24576, num_layers=60, num_attention_heads=48, num_key_value_heads=8,
            vocab_size=100008, max_position_embeddings=4096, torch_dtype="bfloat16")
_2406 = dict(vocab_size=143973, max_position_embeddings=8192, rope_theta=1e6, bos_token_id=143717,
             eos_token_id=143718)

# Baichuan2 (module docstring): baichuan-inc/Baichuan2-{7B,13B}-{Base,Chat} config.json.
_BAICHUAN2 = dict(vocab_size=125696, max_position_embeddings=4096, rms_norm_eps=1e-6, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0, torch_dtype="bfloat16", family="baichuan", output_layer="normhead")
_BAICHUAN2_7B = dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, **_BAICHUAN2)
_BAICHUAN2_13B = dict(hidden_size=5120, intermediate_size=13696, num_layers=40, num_attention_heads=40,
                      num_key_value_heads=40, position_embedding="alibi", **_BAICHUAN2)
# Debug Baichuan2 shapes: multi-head (8 heads: tp up to 8), a vocabulary that needs padding at tp 2.
_BAICHUAN2_TINY = dict(_BAICHUAN2, hidden_size=64, intermediate_size=176, num_layers=4, num_attention_heads=8,
                       num_key_value_heads=8, vocab_size=1003, max_position_embeddings=256, torch_dtype="float32")

MODELS: Dict[str, ModelSpec] = {
    s.name: s
    for s in [
        ModelSpec("aquila2-7b", **_7B, source="BAAI/Aquila2-7B config.json (Oct-2023 revision)"),
        ModelSpec("aquilachat2-7b", **_7B, source="BAAI/AquilaChat2-7B config.json", chat_template="aquila-v1"),
        ModelSpec("aquilachat2-7b-16k", **{**_7B, "max_position_embeddings": 16384}, rope_scaling_factor=8.0,
                  source="BAAI/AquilaChat2-7B-16K config.json", chat_template="aquila"),
        ModelSpec("aquila2-34b", **_34B, source="BAAI/Aquila2-34B config.json (revision 356733c)"),
        ModelSpec("aquilachat2-34b", **_34B, source="BAAI/AquilaChat2-34B config.json", chat_template="aquila-legacy"),
        ModelSpec("aquilachat2-34b-16k", **{**_34B, "max_position_embeddings": 16384}, rope_scaling_factor=4.0,
                  source="BAAI/AquilaChat2-34B-16K config.json", chat_template="aquila"),
        ModelSpec("aquila2-7b-2406", **{**_7B, **_2406}, source="BAAI/Aquila2-7B config.json (2024-06 release)"),
        ModelSpec("aquila2-34b-2406", **{**_34B, **_2406}, source="BAAI/Aquila2-34B config.json (2024-06 release)"),
        # The first generation: FlagAI's names, FlagAI's config (the module docstring).
        ModelSpec("aquila-7b", **_7B, generation=1, source="FlagAI aquila-7b config.json"),
        ModelSpec("aquilachat-7b", **_7B, generation=1, chat_template="aquila-chat",
                  source="FlagAI aquilachat-7b config.json"),
        ModelSpec("aquilacode-7b-nv", **_7B, generation=1, source="FlagAI aquilacode-7b-nv config.json"),
        ModelSpec("aquilacode-7b-ts", **_7B, generation=1, source="FlagAI aquilacode-7b-ts config.json"),
        # Small debug configs: Aquila2-shaped (RMSNorm, SwiGLU, RoPE, GQA, untied, no bias), quick on a CPU.
        ModelSpec("aquila2-tiny", hidden_size=64, intermediate_size=176, num_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=1000, max_position_embeddings=256, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0, torch_dtype="float32", source="debug"),
        ModelSpec("aquila2-small", hidden_size=256, intermediate_size=688, num_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, vocab_size=100008, max_position_embeddings=512, torch_dtype="float32",
                  source="debug: real vocab, 7B-like proportions"),
        # The selfcheck's logits model and the tests' tiny Hugging Face model: 4 key/value groups (tp up to 4), a
        # vocabulary that needs padding for --make-vocab-size-divisible-by 8 at any tp.
        ModelSpec("aquila2-tiny-gqa", hidden_size=64, intermediate_size=96, num_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=1003, max_position_embeddings=128, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0, torch_dtype="float32",
                  source="debug: the logits check of aquila_npu.selfcheck and the tests (tp up to 4)"),
        # The selfcheck's training model: 8 key/value heads, so tensor parallelism over 1, 2, 4 or 8 devices.
        ModelSpec("aquila2-tiny-tp8", hidden_size=256, intermediate_size=512, num_layers=2, num_attention_heads=8,
                  num_key_value_heads=8, vocab_size=1000, max_position_embeddings=128, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0, torch_dtype="float32",
                  source="debug: the training check of aquila_npu.selfcheck --report (tp up to 8)"),
        # Baichuan2 (issue 25; the module docstring).
        ModelSpec("baichuan2-7b", **_BAICHUAN2_7B, source="baichuan-inc/Baichuan2-7B-Base config.json"),
        ModelSpec("baichuan2-7b-chat", **_BAICHUAN2_7B, source="baichuan-inc/Baichuan2-7B-Chat config.json"),
        ModelSpec("baichuan2-13b", **_BAICHUAN2_13B, source="baichuan-inc/Baichuan2-13B-Base config.json"),
        ModelSpec("baichuan2-13b-chat", **_BAICHUAN2_13B, source="baichuan-inc/Baichuan2-13B-Chat config.json"),
        ModelSpec("baichuan2-tiny", **_BAICHUAN2_TINY, source="debug: Baichuan2-7B-shaped (W_pack, NormHead, RoPE)"),
        ModelSpec("baichuan2-tiny-alibi", **{**_BAICHUAN2_TINY, "position_embedding": "alibi"},
                  source="debug: Baichuan2-13B-shaped (W_pack, NormHead, ALiBi)"),
    ]
}


def entry_named(name: str) -> Optional[ModelSpec]:
    """The registry entry a model folder or hub name names (``.../AquilaChat2-7B``, ``BAAI/Aquila-7B``), else None."""
    return MODELS.get(name.rstrip("/").rsplit("/", 1)[-1].lower())


def get_model_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name.lower()]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}") from None


def padded_vocab_size(vocab_size: int, divisible_by: int = 1, tensor_parallel: int = 1) -> int:
    """Megatron's vocab padding: up to a multiple of ``--make-vocab-size-divisible-by`` x tp."""
    multiple = divisible_by * tensor_parallel
    return ((vocab_size + multiple - 1) // multiple) * multiple
