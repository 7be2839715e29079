"""groundingdino's BERT wrapper on transformers 4.x and 5.x: one replacement, bitwise equal to the original.

Applied to whichever distribution provides the `groundingdino` module (groundingdino-py 0.4.0, rf-groundingdino
0.3.0, IDEA-Research's repository: the same `bertwarper.py`, see `provider.py`), when its wrapper is that one.

groundingdino wraps its text encoder in `groundingdino.models.GroundingDINO.bertwarper.BertModelWarper`.
Its `__init__` copies `get_extended_attention_mask`, `invert_attention_mask` and `get_head_mask` off the
`BertModel`; transformers 5 removed all three, so building any groundingdino-py model raises
AttributeError there. Its `forward` also passes `past_key_values_length` to `BertEmbeddings` (renamed
`cache_length` in 5.x) and reads `config.use_return_dict` and the encoder output's `past_key_values`, which
5.x deprecates (for `return_dict` and `cache`; `past_key_values` goes at 5.40).

`install()` replaces exactly two attributes of that one class, `BertModelWarper.__init__` and
`BertModelWarper.forward`, with the functions below, and nothing else (no transformers code, no module
or object of the user's). The replacement keeps the same submodules (`embeddings`, `encoder`, `pooler`),
so every checkpoint's `bert.*` keys load strictly as before; it builds the additive self-attention mask
itself, exactly as 4.57's `get_extended_attention_mask` does for an encoder (groundingdino passes a
[B, L, L] sub-sentence mask, or a [B, L] padding mask: 1 -> 0.0, 0 -> finfo(dtype).min, in the dtype of
the first floating parameter), and calls only what 4.57 and 5.24 share (read in both sources):
`embeddings(input_ids=, position_ids=, token_type_ids=, inputs_embeds=)` and `encoder(hidden, attention_mask=)[0]`.

Measured (shared 2-core dev box, torch 2.14.1 CPU, one thread): logits and boxes of every layer and every
parameter gradient of the demo, of the full SwinT-OGC and of bare BERTs with head sizes 24/32/64 are
bitwise equal between the original on 4.57.6, this replacement on 4.57.6 and this replacement on 5.24.0
(also under bf16 autocast), with BERT's default SDPA attention (a config that forces eager attention
differs between the versions inside transformers itself: 4.57 divides the scores by sqrt(d), 5.x multiplies
by d**-0.5). Two torch threads instead of one change the results of every version alike (the encoder's
top-k picks other queries), so references are compared at one thread. It is installed on 4.x as well: one code path for every version, the one
tests and CI check on both, instead of a 4.x path nobody on 5.x runs.

`install()` is idempotent and is called by nanscope before it builds a groundingdino-py model; it leaves
the class alone when its methods are neither groundingdino's own nor these (a patch the user installed
wins). `uninstall()` puts groundingdino's own methods back. Arguments groundingdino never passes
(`head_mask`, cross-attention, caches, attention/hidden-state outputs, a decoder config) raise
NotImplementedError instead of being silently ignored.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_ORIGINAL: dict[str, Any] = {}  # groundingdino's own __init__ and forward, kept by the first install()


def extended_attention_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """4.57's `get_extended_attention_mask` for an encoder, as an additive mask for the attention scores.

    attention_mask: [B, L] or [B, L, L], 1/True = attend. Returns [B, 1, 1, L] or [B, 1, L, L] in `dtype`:
    0.0 where attended, `torch.finfo(dtype).min` elsewhere.
    """
    if attention_mask.dim() == 3:
        ext = attention_mask[:, None, :, :]
    elif attention_mask.dim() == 2:
        ext = attention_mask[:, None, None, :]
    else:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected [B, L] or [B, L, L]")
    ext = ext.to(dtype=dtype)
    return (1.0 - ext) * torch.finfo(dtype).min


def _parameter_dtype(module: nn.Module) -> torch.dtype:
    """The dtype transformers' `ModuleUtilsMixin.dtype` reports: the first floating parameter's."""
    last = torch.float32
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
        last = p.dtype
    return last


def warper_init(self: nn.Module, bert_model: nn.Module) -> None:
    """`BertModelWarper.__init__`: the same three submodules and config as groundingdino's."""
    nn.Module.__init__(self)
    self.config = bert_model.config
    self.embeddings = bert_model.embeddings
    self.encoder = bert_model.encoder
    self.pooler = bert_model.pooler


def warper_forward(
    self: nn.Module,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    token_type_ids: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    head_mask: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    encoder_hidden_states: torch.Tensor | None = None,
    encoder_attention_mask: torch.Tensor | None = None,
    past_key_values: Any = None,
    use_cache: bool | None = None,
    output_attentions: bool | None = None,
    output_hidden_states: bool | None = None,
    return_dict: bool | None = None,
) -> Any:
    """`BertModelWarper.forward`. input_ids [B, L] (or inputs_embeds [B, L, H]), attention_mask [B, L] or
    [B, L, L]. Returns `last_hidden_state` [B, L, H] and `pooler_output` [B, H] (a tuple when return_dict=False)."""
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

    unsupported = {
        "head_mask": head_mask is not None,
        "encoder_hidden_states": encoder_hidden_states is not None,
        "encoder_attention_mask": encoder_attention_mask is not None,
        "past_key_values": past_key_values is not None,
        "use_cache": bool(use_cache),
        "output_attentions": bool(output_attentions),
        "output_hidden_states": bool(output_hidden_states),
        "a decoder config (is_decoder=True)": bool(getattr(self.config, "is_decoder", False)),
    }
    asked = [name for name, given in unsupported.items() if given]
    if asked:
        raise NotImplementedError(
            f"nanscope's BertModelWarper (nanscope.stacks.groundingdino.bert_compat) does not support {', '.join(asked)}; "
            "groundingdino never passes them"
        )
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("BertModelWarper needs exactly one of input_ids and inputs_embeds")
    first = input_ids if input_ids is not None else inputs_embeds
    batch_size, seq_length = first.shape[0], first.shape[1]
    if attention_mask is None:
        attention_mask = torch.ones((batch_size, seq_length), device=first.device)
    if token_type_ids is None:
        token_type_ids = torch.zeros((batch_size, seq_length), dtype=torch.long, device=first.device)
    mask = extended_attention_mask(attention_mask, _parameter_dtype(self))
    embedding_output = self.embeddings(
        input_ids=input_ids, position_ids=position_ids, token_type_ids=token_type_ids, inputs_embeds=inputs_embeds
    )
    sequence_output = self.encoder(embedding_output, attention_mask=mask)[0]
    pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
    if not (return_dict if return_dict is not None else getattr(self.config, "return_dict", True)):
        return (sequence_output, pooled_output)
    return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=sequence_output, pooler_output=pooled_output)


def _warper_class() -> type:
    from groundingdino.models.GroundingDINO.bertwarper import BertModelWarper

    return BertModelWarper


def _is_groundingdinos(fn: Any) -> bool:
    return getattr(fn, "__module__", None) == "groundingdino.models.GroundingDINO.bertwarper"


REMOVED_IN_5 = ("get_extended_attention_mask", "invert_attention_mask", "get_head_mask")  # what __init__ copies


def needs_replacement(cls: type) -> bool:
    """True for the wrapper groundingdino-py 0.4.0 ships, byte-identical in rf-groundingdino 0.3.0 and
    IDEA-Research's repository: its `__init__` copies BertModel methods transformers 5 removed. A provider
    whose wrapper no longer does is left as it is."""
    code = getattr(cls.__dict__.get("__init__"), "__code__", None)
    return code is not None and not set(REMOVED_IN_5).isdisjoint(code.co_names)


def installed() -> bool:
    """True when BertModelWarper runs this module's `__init__` and `forward`."""
    cls = _warper_class()
    return cls.__init__ is warper_init and cls.forward is warper_forward


def install() -> bool:
    """Make groundingdino's BertModelWarper use the replacement (idempotent). Returns `installed()`:
    False only when someone else already replaced groundingdino's methods (left as they are)."""
    cls = _warper_class()
    if installed():
        return True
    if not (_is_groundingdinos(cls.__init__) and _is_groundingdinos(cls.forward)) or not needs_replacement(cls):
        return False
    _ORIGINAL.setdefault("__init__", cls.__init__)
    _ORIGINAL.setdefault("forward", cls.forward)
    cls.__init__ = warper_init
    cls.forward = warper_forward
    return True


def uninstall() -> None:
    """Put groundingdino's own `__init__` and `forward` back (a no-op unless `install()` replaced them)."""
    cls = _warper_class()
    if installed() and _ORIGINAL:
        cls.__init__ = _ORIGINAL["__init__"]
        cls.forward = _ORIGINAL["forward"]
