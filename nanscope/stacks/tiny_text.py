"""A tiny local BERT and WordPiece vocabulary, written by nanscope so that nothing downloads.

The vocabulary keeps BERT's special-token ids, which transformers and groundingdino hard-code:
[PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103, "."=1012, "?"=1029.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}

# Category and caption words the demo and the tests use; anything else falls back to letter pieces.
WORDS = """
a an the of and with on in at to is are two three four some this that photo picture image
person people man woman child boy girl bicycle car motorcycle airplane bus train truck boat
traffic light fire hydrant stop sign parking meter bench bird cat dog horse sheep cow elephant
bear zebra giraffe backpack umbrella handbag tie suitcase frisbee skis snowboard sports ball kite
baseball bat glove skateboard surfboard tennis racket bottle wine glass cup fork knife spoon bowl
banana apple sandwich orange broccoli carrot hot pizza donut cake chair couch potted plant bed
dining table toilet tv laptop mouse remote keyboard cell phone microwave oven toaster sink
refrigerator book clock vase scissors teddy hair drier toothbrush red blue green yellow black
white small large big left right near far top bottom street road field grass sky water tree house
building window door wall floor sitting standing running walking holding next behind front
""".split()


def build_vocab() -> list[str]:
    """Return the vocabulary as a list indexed by token id."""
    size = 1200
    vocab: list[str | None] = [None] * size
    for tok, idx in SPECIAL_IDS.items():
        vocab[idx] = tok
    fill = [c for c in string.punctuation if c not in ".?"]
    fill += list(string.ascii_lowercase) + list(string.digits)
    fill += ["##" + c for c in string.ascii_lowercase + string.digits]
    seen = set(SPECIAL_IDS) | set(fill)
    for w in WORDS:
        if w not in seen:
            fill.append(w)
            seen.add(w)
    it = iter(fill)
    unused = 0
    for i in range(size):
        if vocab[i] is not None:
            continue
        if i < 100:  # BERT keeps ids 1..99 for [unusedN]
            vocab[i] = f"[unused{unused}]"
            unused += 1
            continue
        vocab[i] = next(it, None) or f"[unused{unused}]"
        if vocab[i].startswith("[unused"):
            unused += 1
    return [v for v in vocab if v is not None]


def write_tiny_text_encoder(folder: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny BERT (hidden 32, 1 layer) with its WordPiece vocab into `folder`.

    The folder then works as groundingdino's `text_encoder_type` and with
    `transformers.AutoTokenizer.from_pretrained(folder)` (a fast tokenizer, needed for char_to_token).
    """
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from nanscope.stacks._hf_progress import quiet_progress_bars

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = build_vocab()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # From the folder, not BertTokenizerFast(vocab_file=...): transformers 5 ignores that argument and
    # builds an empty vocabulary (every word becomes [UNK]); from_pretrained reads vocab.txt in 4.x and 5.x.
    with quiet_progress_bars():
        tok = BertTokenizerFast.from_pretrained(str(folder), do_lower_case=True)
        tok.save_pretrained(str(folder))
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,  # tiny on purpose: the demo must build in seconds on a CPU
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,  # >= 256 tokens plus room for over-long captions
    )
    torch.manual_seed(seed)
    with quiet_progress_bars():  # 5.x draws "Writing model shards" on stderr
        BertModel(config).save_pretrained(str(folder))
    meta = {"written_by": "nanscope", "vocab_size": len(vocab)}
    (folder / "nanscope_text_encoder.json").write_text(json.dumps(meta, sort_keys=True), encoding="utf-8")
    return folder
