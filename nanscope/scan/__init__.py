"""`nanscope scan`: every data bug in a whole dataset, before training, at tokenizer speed.

`scan(DATA, ...)` reads COCO detection JSON, ODVG JSONL (OD and VG) or COCO-style grounding JSON,
builds each sample's caption and positive map as the trainer would (`CaptionRules`), and returns a
`Result` of kind "scan" listing, per code, every affected sample. No model is built.
"""

from __future__ import annotations

from nanscope.scan.captions import CaptionRules
from nanscope.scan.run import ScanRun, scan

__all__ = ["CaptionRules", "ScanRun", "scan"]
