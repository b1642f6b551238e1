"""Chat prompts for generation, from the conversation templates of the data pipeline (``aquila_npu.data.templates``:
the AquilaChat2 templates of FlagAI's ``conversation.py``, and ModelLink's alpaca template).

The prompt is what the template masks before an answer (system text, user turn, assistant marker), the text that
fine-tuning with the same template taught the model to continue. For the AquilaChat2 templates it is the text FlagAI's
``aquila2_hf/predict.py`` encodes: ``conv.get_prompt()`` plus one trailing space (``get_prompt()`` ends the
``aquila`` / ``aquila-chat`` templates with ``Assistant:``, the space completing the ``Assistant: `` marker), e.g.
``<|startofpiece|>{q}<|endofpiece|> `` for AquilaChat2-7B. Evaluation's chat prompts (``conversation_prompt``) are
``get_prompt()`` itself.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

from aquila_npu.data.templates import TEMPLATES

# conversation.py's get_prompt() ends an open assistant turn at the role: "Assistant:" for the ADD_COLON styles, where
# a template's masked text holds the whole "Assistant: " marker (training splits prompt and answer there).
_GET_PROMPT_CUT = {"aquila": 1, "aquila-chat": 1}
# FlagAI's predict() encodes get_prompt() plus one space (every AquilaChat2 template).
_PREDICT_TRAILER = " "
CHAT_TEMPLATES = tuple(sorted(TEMPLATES))


def conversation_prompt(template: str, question: str, system: Optional[str] = None,
                        history: Sequence[Tuple[str, str]] = ()) -> str:
    """The text before the answer to ``question`` after the finished ``history`` turns ((user, assistant) pairs) with
    ``template`` (``system`` replaces the template's system text); for an AquilaChat2 template exactly what
    ``conversation.py``'s ``get_prompt()`` renders for those messages and an open assistant turn (evaluation's chat
    prompts; tests/test_flagai_parity.py renders every template with FlagAI's own code)."""
    try:
        t = TEMPLATES[template]
    except KeyError:
        raise ValueError(f"unknown chat template {template!r}; choose one of {', '.join(CHAT_TEMPLATES)}") from None
    segments = t.segments([*history, (question, "")], system=system)
    masked = "".join(text for text, _ in segments[:-1])
    return masked[:len(masked) - _GET_PROMPT_CUT.get(template, 0)]


def chat_prompt(template: str, question: str, system: Optional[str] = None,
                history: Sequence[Tuple[str, str]] = ()) -> str:
    """What generation's ``--chat`` encodes: for an AquilaChat2 template what FlagAI's ``predict()`` encodes,
    ``conversation_prompt`` plus one space; for alpaca its masked prompt."""
    text = conversation_prompt(template, question, system, history)
    return text if template == "alpaca" else text + _PREDICT_TRAILER


def default_template(spec) -> str:
    """The checkpoint's template (``ModelSpec.chat_template``: FlagAI's choice for the model, recorded by the
    converter from the model's name), else FlagAI's default ``aquila-chat``."""
    return spec.chat_template or "aquila-chat"
