"""rf-groundingdino's cached image features never leak between replays (nanscope/stacks/groundingdino/image_cache.py).

rf-groundingdino 0.3.0's forward runs the backbone only when no `features`/`poss` are kept on the model, so
features left there (by `set_image_tensor`, or by a forward that raised before its end) are what the next
forward runs on, whatever images it is given. Runs where rf-groundingdino provides `groundingdino` (.ci/run's
`rf` environment); groundingdino-py has no cache to leak.
"""

from __future__ import annotations

import pytest
import torch

from nanscope.stacks.groundingdino.provider import find_provider

provider = find_provider()
pytestmark = pytest.mark.skipif(provider is None or provider.distribution != "rf-groundingdino",
                                reason="rf-groundingdino's cache: .ci/run's rf environment")


@pytest.fixture(scope="module")
def replay_b(demo_files, tmp_path_factory):
    """The demo model replaying another batch: the same captions and sizes, other images (seed 1)."""
    from nanscope.replay.session import prepare
    from nanscope.stacks.groundingdino.demo import demo_batch

    path = tmp_path_factory.mktemp("batch_b") / "batch.pt"
    torch.save(demo_batch(1), path)
    return prepare(demo_files.checkpoint, path, config=demo_files.config, hash_checkpoint=False)


def test_a_replay_never_runs_on_features_another_batch_left(demo_replay, replay_b) -> None:
    from nanscope.stacks.groundingdino.image_cache import has_cached_features

    gd = replay_b.stack.find_model(replay_b.model)
    images_a = demo_replay.samples()
    args, kwargs = replay_b.model_call()
    assert not torch.equal(images_a, args[0])
    with torch.no_grad():
        expected = replay_b.model(*args, **kwargs)["pred_logits"]  # nothing kept: rf computes B's features
        gd.set_image_tensor(images_a)
        leaked = replay_b.model(*args, **kwargs)["pred_logits"]  # rf itself, with A's features left on the model
    assert not torch.equal(leaked, expected)  # the leak is real without nanscope
    gd.set_image_tensor(images_a)
    record = replay_b.forward()
    assert torch.equal(record.outputs["pred_logits"], expected)
    assert not has_cached_features(gd)


def test_features_a_failed_forward_kept_are_dropped_on_exit(replay_b) -> None:
    from nanscope.stacks.groundingdino.image_cache import fresh_image_features, has_cached_features

    gd = replay_b.stack.find_model(replay_b.model)
    gd.set_image_tensor(replay_b.samples())
    with pytest.raises(RuntimeError, match="failed"):
        with fresh_image_features(gd):
            assert not has_cached_features(gd)
            gd.set_image_tensor(replay_b.samples())  # what rf's forward does first, then it fails
            raise RuntimeError("the forward failed")
    assert not has_cached_features(gd)
