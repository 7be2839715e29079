"""The terminal report on the demo: exact plain lines, 80 columns in rich mode, NO_COLOR, no markup injection."""

from __future__ import annotations

import re
from io import StringIO

import pytest
from rich.console import Console
from rich.text import Text

from _report_demo import demo_json
from nanscope.findings import Finding, Severity
from nanscope.report.json_io import read_result
from nanscope.report.terminal import render
from nanscope.result import Check, Result

ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def demo(demo_files, tmp_path_factory) -> Result:
    return read_result(demo_json(demo_files, tmp_path_factory))


@pytest.fixture(scope="module")
def cut_phrases(demo_files):
    """Independently: tokenize the demo's long caption and find the target phrases past 256 tokens."""
    import torch
    from transformers import AutoTokenizer

    batch = torch.load(demo_files.batch, weights_only=True)
    tok = AutoTokenizer.from_pretrained(str(demo_files.text_encoder))
    caption, phrases = batch["captions"][2], batch["targets"][2]["phrases"]
    offsets = tok(caption, return_offsets_mapping=True)["offset_mapping"]
    cut = {}
    for box, ph in enumerate(phrases):
        beg = caption.find(ph)
        toks = [k for k, (a, b) in enumerate(offsets) if b > a and a >= beg and b <= beg + len(ph)]
        if any(t >= 256 for t in toks):
            cut[box] = (ph, toks)
    assert len(cut) == 2
    return cut


def _render(result: Result, **console_kw) -> str:
    buf = StringIO()
    render(result, Console(file=buf, **console_kw))
    return buf.getvalue()


def test_plain_lines_for_the_demo(demo, cut_phrases):
    out = _render(demo, width=80)  # a StringIO is not a terminal: plain
    lines = out.splitlines()
    by_code = {ln.split()[0]: ln for ln in lines if re.match(r"NS\d{3} (error|warning|info) ", ln)}
    # The demo's causes: positives truncated past 256 tokens (NS102), -inf padding reaching the criterion
    # (NS101), its NaN loss terms (NS001), the 290-token caption (NS104). Other analyzers may add more.
    assert {"NS102", "NS101", "NS001", "NS104"} <= set(by_code)
    n_err = sum(1 for f in demo.findings if f.severity is Severity.ERROR)
    n_warn = sum(1 for f in demo.findings if f.severity is Severity.WARNING)
    assert lines[0] == f"nanscope inspect: BROKEN - {n_err} error(s), {n_warn} warning(s)"
    assert n_err >= 3 and n_warn >= 1
    n_cut = sum(len(t) for _, t in cut_phrases.values())
    # The token text equals the phrase here, so it is said once.
    where = "; ".join(f"image 2 box {b} {ph!r} tokens {t[0]}-{t[-1]} why truncated"
                      for b, (ph, t) in sorted(cut_phrases.items()))
    assert by_code["NS102"].startswith(f"NS102 error count={n_cut} where={where} | ")
    assert by_code["NS102"] == "NS102 error count=6 where=image 2 box 1 'small red bird' tokens 281-283 " \
                               "why truncated; image 2 box 2 'large blue car' tokens 285-287 " \
                               "why truncated | " + demo.findings[0].message
    assert lines[1] == by_code["NS102"]  # the cause ranks first
    assert lines[2].startswith("NS102 hint: Shorten the caption")
    assert by_code["NS101"].startswith("NS101 error count=887400 where=image 0 layer dec0 columns 250 ")
    assert by_code["NS001"] == ("NS001 error count=2 where=layer last term loss_ce value nan; layer enc term "
                                "loss_ce_enc value nan | 2 of 6 loss terms of nanscope.criterion:NaiveCriterion "
                                "are non-finite: loss_ce, loss_ce_enc.")
    assert by_code["NS104"].startswith("NS104 warning count=1 where=image 2 tokens 290 max_text_len 256 ")
    for f in demo.findings:  # every finding: its line, then its hint line
        i = lines.index(by_code[f.code])
        assert lines[i + 1] == f"{f.code} hint: {f.hint}"
    assert lines[-3:] == ["worst image: 2 (290 tokens, layer dec0)",
                          "  box 1 'small red bird': tokens 281-283 (truncated)",
                          "  box 2 'large blue car': tokens 285-287 (truncated)"]
    assert not ANSI.search(out)


@pytest.mark.parametrize("width", [80, 200])
def test_rich_mode_fits_80_columns(demo, width):
    out = _render(demo, width=width, force_terminal=True, color_system="truecolor")
    lines = out.splitlines()
    assert ANSI.search(out), "rich mode on a terminal uses colour"
    assert max(Text.from_ansi(ln).cell_len for ln in lines) <= 80
    plain = [ANSI.sub("", ln) for ln in lines]
    assert plain[0] == _render(demo, width=80).splitlines()[0]
    for code in ("NS102", "NS101", "NS001", "NS104"):
        assert any(ln.startswith(f"│{code} ") for ln in plain), code
    assert "  box 2 'large blue car': tokens 285-287 (truncated)" in plain


def test_no_color_gives_plain_lines_even_on_a_terminal(demo, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    out = _render(demo, width=120, force_terminal=True)
    assert out == _render(demo, width=80)
    assert not ANSI.search(out) and "│" not in out


def test_user_text_is_neither_markup_nor_a_line_break():
    f = Finding("NS102", Severity.ERROR, 1, "phrase [bold red]x[/] cut",
                ({"image": 0, "box": 0, "phrase": "a\nb [red]c[/red]"},))
    r = Result(kind="inspect", findings=[f])
    plain = _render(r, width=80)
    assert plain.splitlines()[1] == "NS102 error count=1 where=image 0 box 0 'a\\nb [red]c[/red]' | phrase [bold red]x[/] cut"
    rich = ANSI.sub("", _render(r, width=80, force_terminal=True))
    assert "[bold red]x[/]" in rich and "[red]c[/red]" in rich


def test_verify_fix_checks_and_terms():
    r = Result(kind="verify-fix", checks=[Check(1, "loss finite", True, "all terms finite"),
                                          Check(2, "grads finite", False, "3 params NaN")],
               tables={"terms": [{"term": "loss_ce", "before": "nan", "after": 0.5}]})
    lines = _render(r, width=80).splitlines()
    assert lines == ["nanscope verify-fix: NOT FIXED - 1/2 checks pass",
                     "check 1 PASS loss finite: all terms finite",
                     "check 2 FAIL grads finite: 3 params NaN",
                     "loss terms (before -> after):",
                     "  loss_ce: nan -> 0.5"]
    rich = _render(r, width=80, force_terminal=True)
    assert max(Text.from_ansi(ln).cell_len for ln in rich.splitlines()) <= 80
