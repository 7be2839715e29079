"""Generate reports/example.html (inspect) and reports/example-verify-fix.html from the demo. Never hand-edit them.

    python scripts/make_example_report.py

Writes the demo model, checkpoint and batch to reports/demo/ (gitignored), runs `nanscope inspect`
with the unmasked NaiveCriterion and `nanscope verify-fix` on it, and renders both reports with
paths relative to the repository root, so the output depends only on the demo and the versions.
Each report must stay under 2 MB.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_BYTES = 2_000_000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-verify", action="store_true", help="only the inspect report")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")  # third-party deprecation noise
    os.chdir(ROOT)  # inputs are recorded relative to the repository root

    from nanscope.replay.diagnose import inspect
    from nanscope.stacks.groundingdino.demo import write_demo
    from nanscope.report.html import render_html

    files = write_demo(Path("reports/demo"))
    outputs = {}
    result = inspect(files.checkpoint, files.batch, config=files.config,
                     criterion="nanscope.criterion:NaiveCriterion")
    outputs[Path("reports/example.html")] = render_html(result)
    if not args.no_verify:
        from nanscope.verify.pipeline import verify_fix

        fixed = verify_fix(files.checkpoint, files.batch, config=files.config)
        outputs[Path("reports/example-verify-fix.html")] = render_html(fixed)
    for path, text in outputs.items():
        data = text.encode("utf-8")
        if len(data) > MAX_BYTES:
            print(f"{path}: {len(data)} bytes, over the {MAX_BYTES} byte limit", file=sys.stderr)
            return 1
        path.write_bytes(data)
        print(f"{path}: {len(data) / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
