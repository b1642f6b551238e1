"""Every registry entry against BAAI's own model code, as the ``flagai`` package (1.8.4, from the package index, never
installed: ``helpers.flagai``) ships it (issue 24).

For each entry a 2-layer model with the entry's query/key-value head ratio, vocabulary, RoPE theta and scaling, RMSNorm
epsilon and positions (head size 8): the Aquila2 entries (and the debug ones, Aquila2-shaped) are FlagAI's
``AquilaForCausalLM`` (``flagai/model/aquila2/modeling_aquila.py``, what BAAI's Hugging Face repos run with
``trust_remote_code``), the first-generation ones FlagAI's ``AQUILAModel`` (``flagai/model/aquila_model.py``), saved in
FlagAI's own layout and read by our converter's reader. Random weights; our megatron-core model gets them through the
weight-mapping table at tp1 and tp2-pp2 (forked ranks, ``aquila_npu.testing.parity_worker``): fp32 logits within 1e-4,
greedy continuations (our KV-cache generator against FlagAI's own decoding with its KV cache) token for token. A
model with RoPE scaling (the 16K ones) is checked beyond its original context (max positions / factor): its tiny
version has 1/16 of the positions, the factor and theta of the entry, so that takes a few hundred tokens.
"""

import ast
import functools
import inspect
import json
import textwrap

import pytest
import torch

from helpers import aquila1_model, aquila2_model, flagai, flagai_config, flagai_readable, forked_ranks

from aquila_npu.models.flagai_config import ffn_size
from aquila_npu.models.registry import MODELS
from aquila_npu.weights.mapping import hf_names, hf_shapes

# The Aquila family: BAAI's model code is their reference (other families, Baichuan2: tests/test_baichuan2.py).
AQUILA = sorted(n for n, s in MODELS.items() if s.is_aquila)
HEAD = 8
LAYOUTS = ((1, 1), (2, 2))
SHORT, KEEP, NEW = 40, 16, 12


def tiny_version(spec):
    ratio = spec.num_attention_heads // spec.num_key_value_heads
    heads, hidden = 2 * ratio, 2 * ratio * HEAD
    changes = dict(hidden_size=hidden, intermediate_size=ffn_size(hidden, 8), num_layers=2, num_attention_heads=heads,
                   num_key_value_heads=2)
    if spec.rope_scaling_factor:
        changes["max_position_embeddings"] = spec.max_position_embeddings // 16
    return spec.replace(**changes)


def original_context(spec) -> int:
    return int(spec.max_position_embeddings / (spec.rope_scaling_factor or 1))


@torch.no_grad()
def aquila2_reference(model, tokens, prompt, n):
    logits = model(input_ids=tokens, return_dict=True).logits
    out = model(input_ids=torch.tensor([prompt]), use_cache=True, return_dict=True)
    greedy = []
    for _ in range(n):
        greedy.append(int(out.logits[0, -1].argmax()))
        out = model(input_ids=torch.tensor([[greedy[-1]]]), past_key_values=out.past_key_values, use_cache=True,
                    return_dict=True)
    return logits, greedy


@torch.no_grad()
def aquila1_reference(model, tokens, prompt, n):
    """Logits of every position (FlagAI's forward gives them with labels), then FlagAI's own greedy decoding
    (``predictor/aquila.aquila_generate`` at temperature 0: the prompt, then one token at a time from its KV cache)."""
    logits = model(input_ids=tokens, labels=tokens)["logits"]
    seq, prev = list(prompt), 0
    for cur in range(len(prompt), len(prompt) + n):
        step = model(input_ids=torch.tensor([seq[prev:cur]]), start_pos=prev)["logits"]
        seq.append(int(step.argmax(-1)))
        prev = cur
    return logits, seq[len(prompt):]


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """FlagAI's logits and greedy tokens per entry (computed here, before any device setup in this process), ours
    at tp1 and tp2-pp2 (forked ranks)."""
    from aquila_npu.checkpoint.flagai_io import FlagAIReader
    from aquila_npu.models.arch_flags import differences

    d = tmp_path_factory.mktemp("flagai-parity")
    cases, refs = {}, {}
    for i, (name, entry) in enumerate((n, MODELS[n]) for n in AQUILA):
        spec = tiny_version(entry)
        g = torch.Generator().manual_seed(100 + i)
        if spec.rope_scaling_factor:  # one row beyond the original context; the prompt ends where it ends
            length = original_context(spec) + KEEP
            tokens = torch.randint(0, spec.vocab_size, (1, length), generator=g)
            prompt = tokens[0, :original_context(spec)].tolist()
        else:
            tokens = torch.randint(0, spec.vocab_size, (2, SHORT), generator=g)
            prompt = tokens[0, :SHORT - KEEP].tolist()
        if entry.generation == 1:
            model = aquila1_model(spec, str(d / name), seed=i, batch=tokens.shape[0])
            logits, greedy = aquila1_reference(model, tokens, prompt, NEW)
            reader = FlagAIReader(str(d / name))
            assert not differences(reader.spec, spec), differences(reader.spec, spec)
            state = {n: reader.get(n).clone() for n in hf_names(spec)}
        else:
            model = aquila2_model(spec, seed=i)
            logits, greedy = aquila2_reference(model, tokens, prompt, NEW)
            state = {k: v.clone() for k, v in model.state_dict().items()}
        del model
        cases[name] = {"spec": spec.__dict__, "state": state, "tokens": tokens, "keep": KEEP, "prompt": prompt,
                       "new_tokens": NEW}
        refs[name] = (spec, logits[:, -KEEP:].clone(), greedy, len(prompt))
    torch.save(cases, d / "cases.pt")
    del cases
    from aquila_npu.testing import parity_worker

    ours = {}
    for tp, pp in LAYOUTS:
        out = d / f"tp{tp}-pp{pp}.pt"
        logs = d / f"logs-tp{tp}-pp{pp}"
        logs.mkdir()
        codes = forked_ranks(functools.partial(parity_worker.run, str(d / "cases.pt"), str(out), tp, pp), tp * pp,
                             logs, timeout=1200)
        assert codes == [0] * (tp * pp), [(p.name, p.read_text()[-3000:]) for p in sorted(logs.iterdir())]
        ours[tp, pp] = torch.load(out, weights_only=True)
    return refs, ours


@pytest.mark.parametrize("name", AQUILA)
def test_logits_and_greedy_tokens_equal_flagai(name, parity):
    refs, ours = parity
    spec, ref, greedy, prompt_length = refs[name]
    if spec.rope_scaling_factor:
        assert prompt_length == original_context(spec)  # every generated token lies beyond it
    for (tp, pp), results in ours.items():
        got = results[name]
        assert got["logits"].shape == ref.shape
        diff = (got["logits"] - ref).abs().max().item()
        assert diff < 1e-4, f"{name} tp{tp}-pp{pp}: max |diff| {diff:.3g} (logits up to {ref.abs().max():.3g})"
        assert got["greedy"].tolist() == greedy, f"{name} tp{tp}-pp{pp}"


@pytest.mark.parametrize("name", AQUILA)
def test_full_size_shapes_are_flagais(name, tmp_path):
    """The entry at full size: FlagAI's own model class built from the entry's config (on the meta device) has the
    tensors our mapping table expects, shape for shape (first generation: from FlagAI's config.json keys, with
    FlagAI's published multiple_of 256, examples/Aquila/Aquila-sql/metric/configs/flagai-7b/params.json)."""
    from aquila_npu.models.arch_flags import differences
    from aquila_npu.models.flagai_config import spec_from_flagai_config
    from aquila_npu.weights.flagai import flagai_key

    spec = MODELS[name]
    if spec.generation == 1:
        cfg = flagai_config(spec, multiple_of=256)
        assert not differences(spec_from_flagai_config(cfg, name=name), spec)
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        aquila_model = flagai("model.aquila_model")
        with torch.device("meta"):
            model = aquila_model.AQUILAModel.init_from_json(str(tmp_path / "config.json"))
        expected = {flagai_key(k): v for k, v in hf_shapes(spec).items()}
    else:
        configuration = flagai("model.aquila2.configuration_aquila")
        modeling = flagai("model.aquila2.modeling_aquila")
        cfg = {k: v for k, v in spec.to_hf_config().items() if k not in ("architectures", "model_type")}
        with torch.device("meta"):
            model = modeling.AquilaForCausalLM(flagai_readable(configuration.AquilaConfig(**cfg), spec))
        expected = hf_shapes(spec)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


def flagai_template_map() -> dict:
    """The model name -> template table inside FlagAI's ``AquilaForCausalLM.predict`` (read from its source)."""
    modeling = flagai("model.aquila2.modeling_aquila")
    tree = ast.parse(textwrap.dedent(inspect.getsource(modeling.AquilaForCausalLM.predict)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "template_map":
            return ast.literal_eval(node.value)
    raise AssertionError("no template_map in FlagAI's predict()")


@pytest.mark.parametrize("name", AQUILA)
def test_chat_template_is_the_one_flagai_picks(name):
    """FlagAI's predict() picks the template by model name (default aquila-chat); generation's --chat the same."""
    from aquila_npu.inference.chat import default_template

    by_name = {k.lower(): v for k, v in flagai_template_map().items()}
    assert default_template(MODELS[name]) == by_name.get(name, "aquila-chat")


CONVERSATIONS = [([], "你好"), ([("Hello!", "Hi!")], "How are you?"),
                 ([("1+1=", "2"), ("and 2+2?", "4")], "Why is Beijing the capital?\nExplain.")]


def _conversation_names():
    return sorted(flagai("model.aquila2.conversation").conv_templates)


def test_every_flagai_template_is_ours():
    from aquila_npu.inference.chat import CHAT_TEMPLATES

    assert set(_conversation_names()) <= set(CHAT_TEMPLATES)


@pytest.mark.parametrize("system", [None, "You are a helpful assistant."])
@pytest.mark.parametrize("history,question", CONVERSATIONS)
def test_templates_render_as_conversation_py(history, question, system):
    """Every template of FlagAI's conversation.py: evaluation's prompt is ``get_prompt()`` of the messages and an
    open assistant turn, generation's --chat prompt that plus predict()'s space, and the training segments of a
    finished conversation are ``get_prompt()`` of it, split where the answers start."""
    from aquila_npu.data.templates import TEMPLATES
    from aquila_npu.inference.chat import chat_prompt, conversation_prompt

    conversation = flagai("model.aquila2.conversation")
    for name in _conversation_names():
        conv = conversation.get_conv_template(name)
        if system is not None:
            conv.set_system_message(system)
        for user, answer in history:
            conv.append_message(conv.roles[0], user)
            conv.append_message(conv.roles[1], answer)
        finished = conv.copy()
        conv.append_message(conv.roles[0], question)
        conv.append_message(conv.roles[1], None)
        assert conversation_prompt(name, question, system, history) == conv.get_prompt(), name
        assert chat_prompt(name, question, system, history) == conv.get_prompt() + " ", name  # predict()'s prompt
        if history:
            segments = TEMPLATES[name].segments(history, system=system)
            assert "".join(text for text, _ in segments) == finished.get_prompt(), name
            assert [text for text, trained in segments if trained] == \
                [a + TEMPLATES[name].assistant_suffix for _, a in history], name


def docs_row(spec) -> str:
    """The docs' (docs/models.md) row of a registry entry: shape, RoPE, template, reference, how it is checked."""
    rope = f"theta {spec.rope_theta:,.0f}" + (f", linear x{spec.rope_scaling_factor:g}" if spec.rope_scaling_factor
                                              else "")
    checked = "logits, greedy; tp1, tp2-pp2" + (", past the original context" if spec.rope_scaling_factor else "") \
        + ("; FlagAI layout" if spec.generation == 1 else "")
    return (f"| `{spec.name}` | {spec.num_layers} / {spec.hidden_size} / {spec.num_attention_heads} / "
            f"{spec.num_key_value_heads} | {spec.vocab_size:,} | {spec.max_position_embeddings:,} | {rope} | "
            f"{spec.chat_template or '-'} | {spec.reference} | {checked} |")


def test_the_docs_table_is_the_registry():
    from helpers import ROOT

    for doc in ("docs/models.md", "README.md", "README_zh.md"):  # the same rows (README_zh: a translated header)
        text = (ROOT / doc).read_text()
        table = text.split("<!-- models:registry -->\n")[1].split("<!-- /models:registry -->")[0].splitlines()[2:]
        assert table == [docs_row(MODELS[n]) for n in AQUILA], doc
