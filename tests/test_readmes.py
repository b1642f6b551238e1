"""README.md and README_zh.md say the same things: the prose is translated, but the commands, the flags, the layout,
the table rows and their figures are the same (issue 29). The speed figures inside both come from the saved results
(tests/test_doc_figures.py)."""

import re

import pytest

from helpers import ROOT

EN = (ROOT / "README.md").read_text(encoding="utf-8")
ZH = (ROOT / "README_zh.md").read_text(encoding="utf-8")


def code_blocks(text):
    return re.findall(r"```[a-z]*\n(.*?)```", text, re.S)


def commands(block):
    """A block's command lines without comments, quoted free text (a prompt may be translated) as <text>."""
    out = []
    for line in block.splitlines():
        if line.lstrip().startswith("#"):
            continue
        line = re.sub(r"\s+#\s.*$", "", line)
        line = re.sub(r'"[^"$]*"', _text, line)
        if line.strip():
            out.append(" ".join(line.split()))
    return out


def _text(quoted):
    """A double-quoted string of words or of non-ASCII text (free text: it may be translated) as "<text>"; a quoted path,
    flag or variable is kept."""
    inner = quoted.group(0)[1:-1]
    return '"<text>"' if " " in inner or any(ord(c) > 127 for c in inner) else quoted.group(0)


def layout_entries(block):
    """The files and folders a layout block lists (its first column)."""
    return [line.split()[0].rstrip(",") for line in block.splitlines() if line[:1] != " " or line[:3] == "  " and
            not line.startswith("   ")]


def tables(text):
    found, rows = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            found.append(rows)
            rows = []
    return found


def facts(row):
    """What a table row states that no translation changes: its code spans and its numbers."""
    code = sorted(re.findall(r"`([^`]+)`", row))
    numbers = sorted(re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?:e-?\d+)?", re.sub(r"`[^`]+`", "", row)))
    return code, numbers


def test_both_readmes_start_with_the_same_two_commands():
    assert commands(code_blocks(EN)[0]) == commands(code_blocks(ZH)[0])


def test_every_code_block_is_in_both_with_the_same_commands():
    en, zh = code_blocks(EN), code_blocks(ZH)
    assert len(en) == len(zh), (len(en), len(zh))
    for i, (a, b) in enumerate(zip(en, zh)):
        if "aquila_npu/" in a.splitlines()[0]:  # the layout: the same entries (descriptions translated)
            assert layout_entries(a) == layout_entries(b), i
        else:
            assert commands(a) == commands(b), (i, a)


def test_tables_have_the_same_rows_and_the_same_facts():
    en, zh = tables(EN), tables(ZH)
    assert [len(t) for t in en] == [len(t) for t in zh]
    for t_en, t_zh in zip(en, zh):
        for r_en, r_zh in zip(t_en, t_zh):
            assert facts(r_en) == facts(r_zh), (r_en, r_zh)


def test_the_check_sees_a_missing_block_and_a_changed_flag():
    assert commands("python -m aquila_npu.demo --short\n") != commands("python -m aquila_npu.demo\n")
    assert facts("| a | `--x` 1.4x |") != facts("| a | `--y` 1.4x |")
    assert commands('--prompt "Please introduce Beijing."') == commands('--prompt "请介绍一下北京。"')
    assert commands('--load "./ckpt a/"') == commands('--load "./ckpt b/"')  # (free text: has a space)
    assert commands('--load "./ckpt/"') != commands('--load "./ckpt2/"')


@pytest.mark.parametrize("claim", ["any situation", "任意情况下"])
def test_no_readme_promises_exact_resume_in_any_situation(claim):
    assert claim not in EN and claim not in ZH
