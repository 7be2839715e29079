"""`scan --engine ray --address` on a two-node cluster on this machine (`ray.cluster_utils.Cluster`, one CPU per
node): the units are spread over both nodes and the result equals the single-process scan byte for byte."""

from __future__ import annotations

import pytest

from nanscope.report.json_io import result_files
from nanscope.scan import scan

pytestmark = pytest.mark.ray
ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    yield c
    c.shutdown()


def test_two_nodes_equal_one_process(tmp_path, cluster):
    from _grit_data import odvg_line
    from transformers import BertTokenizerFast

    from nanscope.stacks.tiny_text import build_vocab

    te = tmp_path / "te"
    te.mkdir()
    (te / "vocab.txt").write_text("\n".join(build_vocab()) + "\n")
    BertTokenizerFast.from_pretrained(str(te)).save_pretrained(str(te))
    data = tmp_path / "vg.jsonl"
    data.write_text("".join(odvg_line(i, bad=i % 7 == 3) + "\n" for i in range(80)))
    local = scan(data, text_encoder=str(te))
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        far = scan(data, text_encoder=str(te), engine="ray", workers=2, unit_bytes=2000)
    finally:
        ray.shutdown()
    assert far.failed == []
    assert result_files(far.result)[0] == result_files(local.result)[0]
    assert next(f for f in far.result.findings if f.code == "NS201").data["samples"] == [i for i in range(80)
                                                                                         if i % 7 == 3]
