"""verify-fix with the stack's own loss as before (issue 26 item 7): transformers' loss raising on the
demo batch (the class-offset IndexError, NS111) is the bug reproduced, check 1, not a usage error; and
the default after criterion computes the same term families as that loss (its `loss_*_0` auxiliary
terms, `loss_*_enc`), so the checks that compare them compare like with like."""

from __future__ import annotations

import json

import pytest

from nanscope.cli import main


@pytest.fixture(scope="module")
def hf_demo(tmp_path_factory):
    from nanscope.stacks.transformers.demo import write_hf_demo

    return write_hf_demo(tmp_path_factory.mktemp("hf_verify"))


def test_transformers_loss_raising_is_check_1s_reproduction(hf_demo, tmp_path, capsys):
    import transformers

    from nanscope.criterion.transformers_loss import TransformersLoss

    out = tmp_path / "v.json"
    code = main(["verify-fix", str(hf_demo.model), str(hf_demo.batch), "--before", "transformers", "--steps", "2",
                 "--quiet", "--json", str(out)])
    captured = capsys.readouterr()
    assert code in (0, 1), captured.err
    d = json.loads(out.read_text())
    checks = {c["id"]: c for c in d["checks"]}
    assert checks[1]["passed"] and "raised" in checks[1]["detail"] and "IndexError" in checks[1]["detail"]
    assert checks[1]["numbers"]["raised"].startswith("transformers' GroundingDino loss raised IndexError")
    assert "non-finite" not in checks[1]["detail"]

    # the families of terms transformers' own loss computes for this model (its config), read from transformers
    config = transformers.AutoConfig.from_pretrained(str(hf_demo.model))
    expected = set(TransformersLoss(config).weight_dict)
    assert any(k.endswith("_0") for k in expected)  # the demo model has auxiliary decoder losses
    after = {r["term"] for r in d["tables"]["terms"] if r.get("after") is not None and not r.get("metric")}
    after.discard("total (weighted)")
    assert after == expected
    assert all(checks[i]["passed"] for i in (2, 3, 9, 10)), [checks[i]["detail"] for i in (2, 3, 9, 10)]
