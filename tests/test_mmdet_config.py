"""nanscope.stacks.formats.mmdet_config: mmdet .py configs read as data, compared with MMEngine's own reader."""

from __future__ import annotations

import pytest

from nanscope.errors import ConfigError
from nanscope.stacks.formats.mmdet_config import read_config_text, read_mmdet_config

BASE = """
lang_model_name = 'bert-base-uncased'
model = dict(type='GroundingDINO', num_queries=900,
             language_model=dict(type='BertModel', name=lang_model_name, max_tokens=256),
             encoder=dict(num_layers=6, layer_cfg=dict(self_attn_cfg=dict(embed_dims=256, num_levels=4))),
             bbox_head=dict(type='GroundingDINOHead', contrastive_cfg=dict(max_text_len=256, log_scale='auto')),
             test_cfg=dict(max_per_img=300))
max_epochs = 12
"""
CHILD = """
_base_ = ['base.py']
import os
model = dict(num_queries=100, bbox_head=dict(contrastive_cfg=dict(max_text_len=128)),
             test_cfg=dict(_delete_=True, max_per_img=50))
epochs = {{_base_.max_epochs}}
milestones = [8, 11] + [12]
work_dir = os.path.join('runs', 'x')
"""


@pytest.fixture
def cfg(tmp_path):
    (tmp_path / "base.py").write_text(BASE)
    (tmp_path / "child.py").write_text(CHILD)
    return tmp_path / "child.py"


def test_values_equal_mmengines_own_reading(cfg):
    from mmengine.config import Config

    ours = read_mmdet_config(cfg)
    theirs = Config.fromfile(str(cfg)).to_dict()  # executes the file: fine for the test's own config
    for path in ("model.num_queries", "model.language_model.name", "model.bbox_head.contrastive_cfg.max_text_len",
                 "model.bbox_head.contrastive_cfg.log_scale", "model.encoder.layer_cfg.self_attn_cfg.num_levels",
                 "model.test_cfg", "epochs", "milestones", "max_epochs"):
        node = theirs
        for part in path.split("."):
            node = node[part]
        assert ours.get(path) == node, path
    assert ours.skipped == ["work_dir"]  # code, not data: left out and named


def test_code_is_never_run(tmp_path):
    marker = tmp_path / "ran"
    p = tmp_path / "evil.py"
    p.write_text(f"import os\nx = os.system('touch {marker}')\nmodel = dict(a=__import__('os').getcwd())\ny = 3\n")
    got = read_mmdet_config(p)
    assert not marker.exists() and got.values == {"y": 3} and set(got.skipped) == {"x", "model"}


def test_meta_cfg_text_and_errors(tmp_path):
    assert read_config_text("model = dict(num_queries=900, n=-2 ** 2)\n").get("model.n") == -4
    with pytest.raises(ConfigError, match="not valid Python"):
        read_config_text("model = dict(\n")
    with pytest.raises(ConfigError, match="does not exist"):
        read_mmdet_config(tmp_path / "missing.py")
