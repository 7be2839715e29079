"""The scan's tokenizer: the `tokenizers` library's Rust tokenizer, loaded from the files the stack would use.

A stack's `load_tokenizer` goes through transformers' `AutoTokenizer` (and, for groundingdino-py, its
`get_tokenlizer`), which imports torch, transformers and the model code: seconds and hundreds of MiB
before the first line is read. A scan needs only the Rust tokenizer, so it reads the same files itself:
the config's `text_encoder_type` and `max_text_len` (groundingdino-py: the config's values, read as
`nanscope.stacks.formats.safe_config` reads them; transformers: `config.json`), then the text encoder
folder's (or the offline Hugging Face cache's) `tokenizer.json`, or a `vocab.txt` built into the same
WordPiece pipeline transformers' `BertTokenizer` builds (normalizer, pre-tokenizer, [CLS] $A [SEP]).
When neither file is there (another tokenizer family, a name not in the cache), it falls back to the
stack's own loader and keeps that tokenizer's Rust backend. `tests/test_scan_tokenizer.py` checks the
encodings equal transformers' own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_STACK = "groundingdino-py"
SPECIAL_BERT = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


@dataclass(frozen=True)
class ScanTokenizer:
    """A Rust `tokenizers.Tokenizer` (no padding, no truncation) and what the scan needs to know about it."""

    backend: Any  # tokenizers.Tokenizer
    max_text_len: int
    specials: frozenset[str]  # the special tokens ([CLS], [SEP], [PAD], ...)
    name: str | None  # the text encoder folder or Hugging Face name


def backend_of(tokenizer: Any) -> Any:
    """The Rust tokenizer of a transformers fast tokenizer, or the `tokenizers.Tokenizer` itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend if backend is not None else tokenizer


def unpadded(tokenizer: Any) -> Any:
    """A copy of the Rust tokenizer with padding and truncation off (groundingdino pads with 'longest')."""
    from tokenizers import Tokenizer

    backend = backend_of(tokenizer)
    if backend.padding is None and backend.truncation is None:
        return backend
    copy = Tokenizer.from_str(backend.to_str())
    copy.no_padding()
    copy.no_truncation()
    return copy


def special_tokens(tokenizer: Any) -> frozenset[str]:
    """A transformers tokenizer's `all_special_tokens`, or the special added tokens of a Rust tokenizer."""
    names = getattr(tokenizer, "all_special_tokens", None)
    if names is not None:
        return frozenset(names)
    return frozenset(t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special)


def load(*, config: str | os.PathLike[str] | None = None, text_encoder: str | None = None,
         stack: str | None = None) -> ScanTokenizer:
    """The scan's tokenizer and max_text_len, the fast way when the files allow it, else the stack's way."""
    fast = _fast(config=config, text_encoder=text_encoder, stack=stack or DEFAULT_STACK)
    if fast is not None:
        return fast
    from nanscope.stacks import get_stack

    tok, mtl = get_stack(stack or DEFAULT_STACK).load_tokenizer(config=config, text_encoder=text_encoder)
    te = str(text_encoder) if text_encoder else getattr(tok, "name_or_path", None)
    return ScanTokenizer(unpadded(tok), int(mtl), special_tokens(tok), te)


def _fast(*, config: str | os.PathLike[str] | None, text_encoder: str | None, stack: str) -> ScanTokenizer | None:
    """None when the stack's loader must decide (an unknown stack, a config or files this reader does not handle:
    the stack's loader also gives the errors for bad ones)."""
    try:
        if stack == "groundingdino-py":
            te, mtl = _groundingdino_config(config, text_encoder)
        elif stack == "transformers" and (config is not None or text_encoder is not None):
            te, mtl = _transformers_config(config, text_encoder)
        else:
            return None
        folder = _folder(te)
        if folder is None:
            return None
        backend, specials = _from_folder(folder)
    except Exception:  # anything unusual: the stack's loader reads it (and names what is wrong)
        return None
    return ScanTokenizer(backend, mtl, specials, te)


def _groundingdino_config(config: str | os.PathLike[str] | None, text_encoder: str | None) -> tuple[str, int]:
    import importlib.util

    from nanscope.stacks.formats.safe_config import read_values

    if config is None:
        spec = importlib.util.find_spec("groundingdino")
        if spec is None or spec.origin is None:
            raise LookupError("groundingdino-py is not installed")
        path = Path(spec.origin).parent / "config" / "GroundingDINO_SwinT_OGC.py"
    else:
        path = Path(config)
    values = _literal_py(path) if path.suffix == ".py" else None
    if values is None:
        values = read_values(path, trust_py=True)
    if values.get("modelname") != "groundingdino":
        raise ValueError("not a groundingdino config")
    te = text_encoder
    named = str(values.get("text_encoder_type", ""))
    if te is None and config is not None and named and not Path(named).is_absolute() and (path.parent / named).is_dir():
        te = str(path.parent / named)  # a relative folder named in the config, next to it (as the stack finds it)
    return te or named, int(values.get("max_text_len", 256))


def _literal_py(path: Path) -> dict[str, Any] | None:
    """A .py config made only of `name = literal` lines (groundingdino's own configs are), read without running it;
    None for anything else (`_base_`, imports, expressions), which `read_values` runs as the stack does."""
    import ast

    values: dict[str, Any] = {}
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            return None
        try:
            values[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            return None
    return None if "_base_" in values else values


def _transformers_config(config: str | os.PathLike[str] | None, text_encoder: str | None) -> tuple[str, int]:
    mtl = 256
    if config is not None:
        p = Path(config)
        data = json.loads(((p / "config.json") if p.is_dir() else p).read_text(encoding="utf-8"))
        mtl = int(data.get("max_text_len", 256))
    return str(text_encoder if text_encoder is not None else Path(str(config)).resolve()), mtl


def _folder(te: str) -> Path | None:
    """A local folder, or the offline Hugging Face cache's snapshot holding the tokenizer files of a name."""
    p = Path(te)
    if p.is_dir():
        return p.resolve()
    if te.startswith((".", "/", "~")) or te.count("/") > 1:  # a path that is not there: the stack's loader says so
        return None
    from huggingface_hub import try_to_load_from_cache

    for name in ("tokenizer.json", "vocab.txt"):
        hit = try_to_load_from_cache(te, name)
        if isinstance(hit, str):
            return Path(hit).parent
    return None


def _from_folder(folder: Path) -> tuple[Any, frozenset[str]]:
    from tokenizers import Tokenizer

    cfg_file = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
    if (folder / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    elif (folder / "vocab.txt").is_file() and "bert" in str(cfg.get("tokenizer_class", "Bert")).lower():
        tok = _bert_from_vocab(folder / "vocab.txt", cfg)
    else:
        raise LookupError(f"no tokenizer.json or BERT vocab.txt in {folder}")
    tok.no_padding()
    tok.no_truncation()
    return tok, special_tokens(tok)


def _bert_from_vocab(vocab_file: Path, cfg: dict[str, Any]) -> Any:
    """transformers' `BertTokenizer(vocab_file=...)` pipeline, built with `tokenizers` alone."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    vocab = {}
    with open(vocab_file, encoding="utf-8") as f:
        for index, token in enumerate(f):
            vocab[token.rstrip("\n")] = index
    unk, cls, sep = (str(cfg.get(k, d)) for k, d in (("unk_token", "[UNK]"), ("cls_token", "[CLS]"),
                                                      ("sep_token", "[SEP]")))
    pad, mask = str(cfg.get("pad_token", "[PAD]")), str(cfg.get("mask_token", "[MASK]"))
    tok = Tokenizer(WordPiece(vocab, unk_token=unk))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True,
                                                handle_chinese_chars=bool(cfg.get("tokenize_chinese_chars", True)),
                                                strip_accents=cfg.get("strip_accents"),
                                                lowercase=bool(cfg.get("do_lower_case", True)))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (pad, unk, cls, sep, mask)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, vocab.get(cls, 2)), (sep, vocab.get(sep, 3))])
    return tok
