"""Shared fixtures. Nothing downloads: the demo model uses a tiny local BERT written by nanscope."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def demo_files(tmp_path_factory: pytest.TempPathFactory):
    """The demo (text encoder, config, checkpoint, long batch), written once per test session. Read-only."""
    from nanscope.stacks.demo import write_demo

    return write_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def demo_replay(demo_files):
    """A prepared Replay of the demo batch (model loaded from the checkpoint). Do not mutate the model."""
    from nanscope.replay.session import prepare

    return prepare(demo_files.checkpoint, demo_files.batch, config=demo_files.config, hash_checkpoint=False)
