"""Loss-term names: which layer a term belongs to, and one spelling for the same term across trainers.

Every DETR-style criterion returns one term per loss kind and layer, but trainers spell the layer differently:

| layer                     | nanscope, DETR, transformers | Open-GroundingDino | MMDetection        |
|---------------------------|------------------------------|--------------------|--------------------|
| last decoder layer        | `loss_ce`                    | `loss_ce`          | `loss_cls`         |
| decoder layer i (aux)     | `loss_ce_0`                  | `loss_ce_0`        | `d0.loss_cls`      |
| encoder proposals         | `loss_ce_enc`                | `loss_ce_interm`   | `enc_loss_cls`     |
| denoising queries         | `loss_ce_dn`, `loss_ce_dn_0` | (none)             | `dn_loss_cls`, `d0.dn_loss_cls` |

`canonical` writes every name in nanscope's spelling, so 'loss_ce_interm' and 'loss_ce_enc' are one term
wherever terms are compared (verify-fix's checks, NS404's reference ratios) and `term_layer` gives the layer
('last' or the last decoder layer's name, 'dec{i}', 'enc'). Nothing else in nanscope parses term names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

ENCODER_SUFFIXES: tuple[str, ...] = ("_enc", "_interm")

_MMDET = re.compile(r"^(?:d(?P<layer>\d+)\.)?(?P<enc>enc_)?(?P<dn>dn_)?(?P<base>loss_\w+)$")


@dataclass(frozen=True)
class Term:
    """One loss term's parts: `base` ('loss_ce'), `layer` ('last', 'dec3', 'enc') and `dn` (denoising)."""

    base: str
    layer: str
    dn: bool = False

    @property
    def name(self) -> str:
        """nanscope's spelling: 'loss_ce', 'loss_ce_3', 'loss_ce_enc', 'loss_ce_dn_3'."""
        suffix = {"last": "", "enc": "_enc"}.get(self.layer, f"_{self.layer[3:]}")
        return f"{self.base}{'_dn' if self.dn else ''}{suffix}"


def parse(name: str) -> Term:
    """Split a term name in any of the spellings above; a name that fits none is a last-layer term."""
    if m := _MMDET.match(name):
        if m["layer"] is not None or m["enc"] or m["dn"]:
            layer = "enc" if m["enc"] else (f"dec{m['layer']}" if m["layer"] is not None else "last")
            return Term(m["base"], layer, bool(m["dn"]))
    for suffix in ENCODER_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return Term(name[: -len(suffix)], "enc")
    head, _, tail = name.rpartition("_")
    layer = "last"
    if head and tail.isdigit():
        name, layer = head, f"dec{tail}"
    if name.endswith("_dn") and len(name) > 3:
        return Term(name[:-3], layer, True)
    return Term(name, layer)


def canonical(name: str) -> str:
    """The term's name in nanscope's spelling: 'loss_ce_interm' -> 'loss_ce_enc', 'd0.loss_cls' -> 'loss_cls_0'."""
    return parse(name).name


def term_layer(name: str, last: str = "last") -> str:
    """The layer of a term: `last` (e.g. 'dec5') for the last decoder layer's, 'dec{i}' or 'enc'."""
    layer = parse(name).layer
    return last if layer == "last" else layer


def base_name(name: str) -> str:
    """The loss kind without its layer: 'loss_ce_3' -> 'loss_ce', 'enc_loss_cls' -> 'loss_cls'."""
    return parse(name).base


def loss_term_names(terms: Mapping[str, Any], weight_dict: Mapping[str, float] | None) -> list[str]:
    """The terms that are losses: those in `weight_dict` with a non-zero weight (DETR convention), else those
    that require grad (metrics such as `class_error` do not)."""
    if isinstance(weight_dict, Mapping) and any(k in weight_dict for k in terms):
        return [k for k in terms if k in weight_dict and float(weight_dict[k]) != 0]
    return [k for k, v in terms.items() if getattr(v, "requires_grad", False)]
