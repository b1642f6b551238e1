"""Chat prompts for generation, from the conversation templates of the data pipeline (``aquila_npu.data.templates``:
the AquilaChat2 templates of FlagAI's ``conversation.py``, and ModelLink's alpaca template).

The prompt is what the template masks before an answer (system text, user turn, assistant marker), the text that
fine-tuning with the same template taught the model to continue. For the AquilaChat2 templates it is the text FlagAI's
``aquila2_hf/predict.py`` encodes: ``conv.get_prompt()`` plus one trailing space (``get_prompt()`` ends the
``aquila`` / ``aquila-chat`` templates with ``Assistant:``, the space completing the ``Assistant: `` marker), e.g.
``<|startofpiece|>{q}<|endofpiece|> `` for AquilaChat2-7B.
"""

from __future__ import annotations

from typing import Optional

from aquila_npu.data.templates import TEMPLATES

# What FlagAI's predict() adds after the masked prompt text of each AquilaChat2 template.
_FLAGAI_TRAILER = {"aquila-v1": " ", "aquila-legacy": " ", "aquila": "", "aquila-chat": ""}
CHAT_TEMPLATES = tuple(sorted(TEMPLATES))


def chat_prompt(template: str, question: str, system: Optional[str] = None) -> str:
    """The single-turn prompt for ``question`` with ``template`` (``system`` replaces the template's system text)."""
    try:
        t = TEMPLATES[template]
    except KeyError:
        raise ValueError(f"unknown chat template {template!r}; choose one of {', '.join(CHAT_TEMPLATES)}") from None
    masked, _ = t.segments([(question, "")], system=system)[0]
    return masked + _FLAGAI_TRAILER.get(template, "")


def default_template(spec) -> str:
    """The checkpoint's template (``ModelSpec.chat_template``: FlagAI's choice for the model, recorded by the
    converter from the model's name), else FlagAI's default ``aquila-chat``."""
    return spec.chat_template or "aquila-chat"
