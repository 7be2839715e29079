"""The scan's own tokenizer loader (`nanscope.scan.tokenizer`) against transformers' AutoTokenizer on the same files:
the same ids, tokens and offsets; and a scan that never imports torch, transformers or groundingdino."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nanscope.scan import tokenizer as tk

CAPTIONS = [
    "a cat . a dog . person .",
    "Café au lait, naïve résumé: UPPER lower MiXeD",
    "a red ball on the table 的 猫 next to a wooden chair .",
    "tabs\tand  double  spaces\nand newlines",
    "x" * 300 + " over-long-words-that-split ##hash [CLS] [SEP]",
    "",
]


def _tokenizer_files(folder: Path, *, vocab_only: bool) -> Path:
    from transformers import BertTokenizerFast

    from nanscope.stacks.tiny_text import build_vocab

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(build_vocab()) + "\n", encoding="utf-8")
    if not vocab_only:
        BertTokenizerFast.from_pretrained(str(folder), do_lower_case=True).save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("vocab_only", [False, True], ids=["tokenizer.json", "vocab.txt"])
def test_encodings_equal_transformers(tmp_path, vocab_only):
    from transformers import AutoTokenizer, BertTokenizerFast

    folder = _tokenizer_files(tmp_path / "te", vocab_only=vocab_only)
    # a vocab.txt alone: what groundingdino's BERT tokenizer class reads from it
    ref = (BertTokenizerFast if vocab_only else AutoTokenizer).from_pretrained(str(folder))
    ours = tk.load(text_encoder=str(folder))
    assert ours.max_text_len == 256  # SwinT-OGC's
    assert ours.specials == frozenset(ref.all_special_tokens)
    for cap in CAPTIONS:
        want = ref(cap)
        got = ours.backend.encode(cap)
        assert got.ids == want["input_ids"], cap
        assert got.tokens == ref.convert_ids_to_tokens(want["input_ids"])
        for c in range(len(cap)):
            assert got.char_to_token(c) == want.char_to_token(c), (cap, c)


def test_config_values_are_read_without_groundingdino(tmp_path):
    folder = _tokenizer_files(tmp_path / "te", vocab_only=False)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"modelname": "groundingdino", "text_encoder_type": "te", "max_text_len": 128}))
    ours = tk.load(config=str(cfg))  # the relative folder next to the config, as the stack finds it
    assert ours.max_text_len == 128 and ours.name == str(folder)


def test_a_scan_imports_no_torch_transformers_or_groundingdino(tmp_path):
    folder = _tokenizer_files(tmp_path / "te", vocab_only=False)
    data = tmp_path / "vg.jsonl"
    line = {"filename": "a.jpg", "height": 10, "width": 10,
            "grounding": {"caption": "a cat", "regions": [{"bbox": [1, 1, 5, 5], "phrase": "a cat",
                                                            "tokens_positive": [[0, 5]]}]}}
    data.write_text("\n".join(json.dumps(line) for _ in range(10)) + "\n")
    code = ("import sys\nfrom nanscope.scan import scan\n"
            f"r = scan({str(data)!r}, text_encoder={str(folder)!r}).result\n"
            "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'groundingdino'})\n"
            "print(r.summary['samples'], heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(tk.__file__).resolve().parents[2])})
    assert out.stdout.split("\n")[0] == "10 []"


def test_the_default_config_is_read_as_groundingdino_reads_it():
    from nanscope.stacks.groundingdino.stack import default_config_path, load_config

    cfg = load_config(None)  # groundingdino's SLConfig running the .py
    values = tk._literal_py(default_config_path())
    assert values is not None
    assert {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()} == \
        {k: cfg[k] for k in values}


def test_the_environment_equals_the_one_reports_record():
    from nanscope.result import environment as with_torch
    from nanscope.scan.run import environment

    assert environment() == with_torch("cpu")
