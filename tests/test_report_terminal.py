"""The terminal report on the demo: exact plain lines, 80 columns in rich mode, NO_COLOR, no markup injection."""

from __future__ import annotations

import re
from io import StringIO

import pytest
from rich.console import Console
from rich.text import Text

from _report_demo import demo_json
from nanscope.findings import CATALOGUE, Finding, Severity
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


def test_plain_lines_for_the_demo(demo, cut_phrases, demo_files):
    """One cause, once: the 290-token caption leads, with the three findings it explains under it and
    its fix said once; the unmasked padding is the second cause, with the NaN loss terms under it."""
    import torch
    from transformers import AutoTokenizer

    out = _render(demo, width=80)  # a StringIO is not a terminal: plain
    lines = out.splitlines()
    batch = torch.load(demo_files.batch, weights_only=True)
    tok = AutoTokenizer.from_pretrained(str(demo_files.text_encoder))
    n_tok = [len(tok(c)["input_ids"]) for c in batch["captions"]]
    long = [i for i, n in enumerate(n_tok) if n > 256]
    assert long == [2]
    # Two causes, both errors: the long caption (its cut positives are errors) and the unmasked padding.
    assert lines[0] == "nanscope inspect: BROKEN - 2 cause(s): 2 error(s), 0 warning(s)"
    phrases = [ph for _, (ph, _) in sorted(cut_phrases.items())]
    assert lines[1].startswith(f"cause 1: NS104 error count=1 where=image 2 tokens {n_tok[2]} max_text_len 256 "
                               f"phrases_cut {phrases!r} | The caption of image 2 is {n_tok[2]} tokens, longer than "
                               f"max_text_len=256; 2 target phrase(s) lose tokens to truncation.")
    assert lines[2] == f"cause 1 fix: {CATALOGUE['NS104'].hint}"
    n_cut = sum(len(t) for _, t in cut_phrases.values())
    # The token text equals the phrase here, so it is said once.
    where = "; ".join(f"image 2 box {b} {ph!r} tokens {t[0]}-{t[-1]} why truncated"
                      for b, (ph, t) in sorted(cut_phrases.items()))
    assert lines[3].startswith(f"  NS102 error count={n_cut} where={where} | ")
    assert lines[4].startswith(f"  NS103 error count={len(cut_phrases)} where=image 2 box 1 ")
    assert lines[5].startswith(f"  NS203 warning count={len(cut_phrases)} where=image 2 term class box 1 ")
    assert lines[6].startswith("cause 2: NS101 error count=887400 where=image 0 layer dec0 columns 250 ")
    assert lines[7] == f"cause 2 fix: {CATALOGUE['NS101'].hint}"
    assert lines[8] == ("  NS001 error count=2 where=layer last term loss_ce value nan; layer enc term "
                        "loss_ce_enc value nan | 2 of 6 loss terms of nanscope.criterion:NaiveCriterion "
                        "are non-finite: loss_ce, loss_ce_enc.")
    assert lines[9:] == ["worst image: 2 (290 tokens, layer dec0)",
                         "  box 1 'small red bird': tokens 281-283 (truncated)",
                         "  box 2 'large blue car': tokens 285-287 (truncated)"]
    # Each fix is said once: the consequences' own hints (NS102's "Shorten the caption") are not repeated.
    for code in ("NS102", "NS103", "NS203", "NS001"):
        assert CATALOGUE[code].hint not in out
    assert not ANSI.search(out)


@pytest.mark.parametrize("width", [80, 200])
def test_rich_mode_fits_80_columns(demo, width):
    out = _render(demo, width=width, force_terminal=True, color_system="truecolor")
    lines = out.splitlines()
    assert ANSI.search(out), "rich mode on a terminal uses colour"
    assert max(Text.from_ansi(ln).cell_len for ln in lines) <= 80
    plain = [ANSI.sub("", ln) for ln in lines]
    assert plain[0] == _render(demo, width=80).splitlines()[0]
    rows = [ln for ln in plain if re.match(r"│\s*(\d+|) │ (└ )?NS\d{3} ", ln)]  # first line of each table row
    assert [re.match(r"│\s*(\d*) │ (└ )?(NS\d{3})", ln).group(1, 3) for ln in rows] == [
        ("1", "NS104"), ("", "NS102"), ("", "NS103"), ("", "NS203"), ("2", "NS101"), ("", "NS001")]
    assert sum(ln.startswith("  fix: ") for ln in plain) == 2  # one fix per cause
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
    assert plain.splitlines()[1] == ("cause 1: NS102 error count=1 where=image 0 box 0 'a\\nb [red]c[/red]' | "
                                     "phrase [bold red]x[/] cut")
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


def test_rich_mode_repeats_the_verdict_last_so_a_30_row_terminal_shows_it(demo):
    """The demo's report is taller than a 30-row terminal: its verdict must be on the screen at the end."""
    out = _render(demo, width=80, height=30, force_terminal=True, color_system="truecolor")
    plain = [ANSI.sub("", ln) for ln in out.splitlines()]
    verdict = _render(demo, width=80).splitlines()[0]  # the plain report's first line
    assert len(plain) > 30 and plain[0] == verdict
    assert verdict in plain[-29:] and plain[-1] == verdict  # 29 rows + the shell prompt
