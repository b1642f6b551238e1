"""AquilaChat2 conversation templates (FlagAI ``flagai/model/aquila2/conversation.py``, ``aquila2_hf/predict.py``).

A single-turn prompt is built as FlagAI's ``predict()`` builds it: the template's prompt for [(human, question),
(assistant, None)], then one trailing space, then encoded; generation stops at ``</s>``.

* ``aquila-v1`` (AquilaChat2-7B): ``<|startofpiece|>{q}<|endofpiece|>``, no system prompt.
* ``aquila-legacy`` (AquilaChat2-34B): ``{S}\\n\\n### Human: {q}\\n### Assistant: ``.
* ``aquila`` (the 16K models): ``{S}###Human: {q}###Assistant:``, ``</s>`` after each answer.
* ``aquila-chat`` (FlagAI's default): like ``aquila`` with ``###`` after every message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the human's questions.")


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    system: str
    roles: Tuple[str, str]  # (human, assistant)
    style: str  # FastChat SeparatorStyle: "add_colon_single", "add_colon_two", "no_colon_two"
    sep: str
    sep2: str

    def prompt(self, messages: Sequence[Tuple[str, Optional[str]]], system: Optional[str] = None) -> str:
        """FastChat's ``Conversation.get_prompt`` for (role, message) pairs; message None = the model's turn."""
        ret = self.system if system is None else system
        if self.style == "add_colon_single":
            ret += self.sep
            for role, msg in messages:
                ret += f"{role}: {msg}{self.sep}" if msg else f"{role}:"
            return ret
        seps = (self.sep, self.sep2)
        if self.style == "add_colon_two":
            ret += seps[0]
            for i, (role, msg) in enumerate(messages):
                ret += f"{role}: {msg}{seps[i % 2]}" if msg else f"{role}:"
            return ret
        if self.style == "no_colon_two":
            for i, (role, msg) in enumerate(messages):
                ret += f"{role}{msg}{seps[i % 2]}" if msg else role
            return ret
        raise ValueError(f"unknown separator style {self.style}")

    def single_turn(self, question: str, system: Optional[str] = None,
                    history: Sequence[Tuple[str, str]] = ()) -> str:
        """The text the model continues for ``question`` (after earlier (question, answer) turns), with FlagAI's
        trailing space."""
        human, assistant = self.roles
        messages: List[Tuple[str, Optional[str]]] = []
        for q, a in history:
            messages += [(human, q), (assistant, a)]
        messages += [(human, question), (assistant, None)]
        return self.prompt(messages, system) + " "


TEMPLATES: Dict[str, ChatTemplate] = {t.name: t for t in (
    ChatTemplate("aquila-chat", SYSTEM, ("Human", "Assistant"), "add_colon_single", "###", ""),
    ChatTemplate("aquila-legacy", SYSTEM + "\n\n", ("### Human: ", "### Assistant: "), "no_colon_two", "\n", "</s>"),
    ChatTemplate("aquila", SYSTEM, ("Human", "Assistant"), "add_colon_two", "###", "</s>"),
    ChatTemplate("aquila-v1", "", ("<|startofpiece|>", "<|endofpiece|>"), "no_colon_two", "", "</s>"),
)}


def get_template(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; choose one of {', '.join(sorted(TEMPLATES))}") from None


def default_template(spec) -> str:
    """FlagAI's choice per model, recognised from the architecture: 16K models (linear RoPE scaling) ``aquila``,
    AquilaChat2-7B ``aquila-v1``, AquilaChat2-34B ``aquila-legacy``, anything else ``aquila-chat``."""
    if spec.rope_scaling_factor:
        return "aquila"
    if (spec.hidden_size, spec.num_layers) == (4096, 32):
        return "aquila-v1"
    if (spec.hidden_size, spec.num_layers) == (6144, 60):
        return "aquila-legacy"
    return "aquila-chat"
