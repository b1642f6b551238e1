"""Prompt templates for instruction data: ModelLink's alpaca template and the AquilaChat2 conversation templates.

A template renders a conversation (user/assistant turns) into text segments, each marked trained or not: everything
the model is given (system prompt, user turns, role markers) is masked out of the loss; each assistant reply and the
text that ends it are trained. Segments are tokenized one by one, so the masked span is exactly the prompt's tokens.

``alpaca`` (ModelLink's ``GeneralInstructionHandler``; the default)::

    "\\n" + SYSTEM + "\\n" + "### Instruction:\\n" + instruction + "\\n" + input + "\\n" + "### Response:\\n"  masked
    output + "\\n"                                                                                     trained

AquilaChat2 (FlagAI / FastChat ``conversation.py``), per turn: masked ``user_prefix + question + user_suffix +
assistant_prefix``, trained ``answer + assistant_suffix``; the system text comes first, masked.
"""

from dataclasses import dataclass

ALPACA_SYSTEM = ("Below is an instruction that describes a task, paired with an input that provides further context. "
                 "Write a response that appropriately completes the request. Please note that you need to think "
                 "through your response logically and step by step.")
AQUILA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the human's questions.")


@dataclass(frozen=True)
class Template:
    name: str
    system: str
    system_format: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    join_input: str  # how an alpaca row's instruction and input become the user turn: "always" or "if-input"
    doc: str

    def user_text(self, instruction, inp):
        if self.join_input == "always":
            return instruction + "\n" + inp
        return instruction + "\n" + inp if inp else instruction

    def segments(self, turns, system=None):
        """[(text, trained)] for ``turns`` = [(user, assistant), ...]; ``system`` replaces the template's system
        text."""
        out = []
        prompt = self.system_format.format(system=self.system if system is None else system)
        for user, assistant in turns:
            prompt += self.user_prefix + user + self.user_suffix + self.assistant_prefix
            out.append((prompt, False))
            out.append((assistant + self.assistant_suffix, True))
            prompt = ""
        return out


TEMPLATES = {t.name: t for t in (
    Template("alpaca", ALPACA_SYSTEM, "\n{system}\n", "### Instruction:\n", "\n", "### Response:\n", "\n", "always",
             "ModelLink's alpaca template (GeneralInstructionHandler); the default"),
    Template("aquila-v1", "", "{system}", "<|startofpiece|>", "", "<|endofpiece|>", "</s>", "if-input",
             "AquilaChat2-7B: <|startofpiece|>{q}<|endofpiece|>{a}</s>"),
    Template("aquila-legacy", AQUILA_SYSTEM + "\n\n", "{system}", "### Human: ", "\n", "### Assistant: ", "</s>",
             "if-input", "AquilaChat2-34B: SYSTEM\\n\\n### Human: {q}\\n### Assistant: {a}</s>"),
    Template("aquila", AQUILA_SYSTEM, "{system}###", "Human: ", "###", "Assistant: ", "</s>", "if-input",
             "AquilaChat2-7B-16K / 34B-16K: SYSTEM###Human: {q}###Assistant: {a}</s>"),
    Template("aquila-chat", AQUILA_SYSTEM, "{system}###", "Human: ", "###", "Assistant: ", "###", "if-input",
             "FlagAI's default (AquilaChat-7B): SYSTEM###Human: {q}###Assistant: {a}###"),
    Template("aquila-v2", AQUILA_SYSTEM + "\n\n", "{system}", "<|startofpiece|>", "", "<|endofpiece|>", "</s>",
             "if-input", "AquilaChat2-70B-Expr: SYSTEM\\n\\n<|startofpiece|>{q}<|endofpiece|>{a}</s>"),
)}

_USER_ROLES = ("human", "user")
_ASSISTANT_ROLES = ("gpt", "assistant", "bot")


def parse_conversation(value):
    """(system or None, [(user, assistant), ...]) from a list of turns, ShareGPT style ``{"from": "human"|"gpt",
    "value": ...}`` or OpenAI style ``{"role": "user"|"assistant", "content": ...}``; an optional first ``system``
    turn. Raises ValueError saying what is wrong."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"expected a non-empty list of turns, found {type(value).__name__}")
    roles, texts = [], []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {i + 1} is {type(turn).__name__}, not an object")
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if not isinstance(role, str) or not isinstance(text, str):
            raise ValueError(f"turn {i + 1} needs a string 'from'/'role' and a string 'value'/'content'")
        roles.append(role.lower())
        texts.append(text)
    system = None
    if roles[0] == "system":
        system = texts[0]
        roles, texts = roles[1:], texts[1:]
    if not roles or len(roles) % 2:
        raise ValueError("expected alternating user / assistant turns ending with an assistant turn")
    turns = []
    for i in range(0, len(roles), 2):
        if roles[i] not in _USER_ROLES or roles[i + 1] not in _ASSISTANT_ROLES:
            raise ValueError(f"turns {i + 1}-{i + 2} are {roles[i]!r}, {roles[i + 1]!r}: expected a user turn "
                             f"({'/'.join(_USER_ROLES)}) then an assistant turn ({'/'.join(_ASSISTANT_ROLES)})")
        turns.append((texts[i], texts[i + 1]))
    return system, turns
