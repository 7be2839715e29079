"""The scan fixtures' script, loaded from fixtures/scan/make_fixtures.py (tests build its images in a scratch folder:
binary files are not committed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "scan"
DATA_FILES = ("od.jsonl", "label_map.json", "coco.json", "vg.jsonl", "grounding.json")


def load_maker() -> Any:
    spec = importlib.util.spec_from_file_location("make_scan_fixtures", FIX / "make_fixtures.py")
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod
