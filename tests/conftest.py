"""Shared fixtures. Nothing downloads: the demo model uses a tiny local BERT written by nanscope."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

# The subset .ci/run also runs on transformers 4.57.x (`./scripts/test -m transformers4`): building the
# model, capture, the criterion against transformers' own loss and matcher, the demo, and the BERT
# wrapper's bitwise check against groundingdino's own wrapper, which only builds on 4.x.
TRANSFORMERS4_SUBSET = (
    "test_bert_compat.py",
    "test_tiny_text.py",
    "test_hf_progress.py",
    "test_capture.py",
    "test_checkpoint.py",
    "test_full_size.py",
    "test_criterion.py",
    "test_matcher.py",
    "test_verify.py",
    "test_demo.py",
)


# The subset .ci/run runs on the core install (`-m core`), where no `groundingdino` module exists: the
# transformers stack end to end and the messages that say how to install a provider.
CORE_SUBSET = (
    "test_providers.py",
    "test_stack_transformers.py",
    "test_stack_transformers_cli.py",
    "test_hf_batch.py",
    "test_imports.py",
    "test_cli_startup.py",
)

# The subset .ci/run runs with rf-groundingdino 0.3.0 instead of groundingdino-py (`-m rf`): the
# groundingdino-py stack's build, capture, replay, demo and BERT replacement, its outputs against
# groundingdino-py's, and its cached image features.
RF_SUBSET = (
    "test_providers.py",
    "test_image_cache.py",
    "test_stacks.py",
    "test_capture.py",
    "test_demo.py",
    "test_bert_compat.py",
)

SUBSETS = {"transformers4": TRANSFORMERS4_SUBSET, "core": CORE_SUBSET, "rf": RF_SUBSET}


def pytest_ignore_collect(collection_path, config: pytest.Config) -> bool | None:
    """`-m SUBSET` (exactly one subset name): the other test files are not even imported. The core install has
    no `groundingdino` module, and test files that import it at the top would fail to collect there."""
    files = SUBSETS.get((config.option.markexpr or "").strip())
    if files is not None and collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        return collection_path.name not in files or None
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for marker, files in SUBSETS.items():
            if item.path.name in files:
                item.add_marker(getattr(pytest.mark, marker))


def _load_fixture_builder():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).parents[1] / "fixtures" / "build.py"
    spec = importlib.util.spec_from_file_location("nanscope_fixtures_build", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def fixture_files(tmp_path_factory: pytest.TempPathFactory):
    """fixtures/build.py's files (demo model, checkpoint, batches), built once per test session. Read-only."""
    return _load_fixture_builder().build(tmp_path_factory.mktemp("fixtures"))


@pytest.fixture(scope="session")
def demo_files(fixture_files):
    """The demo (text encoder, config, checkpoint, long batch), written once per test session. Read-only."""
    return fixture_files.demo


@pytest.fixture(scope="session")
def demo_replay(demo_files):
    """A prepared Replay of the demo batch (model loaded from the checkpoint). Do not mutate the model."""
    from nanscope.replay.session import prepare

    return prepare(demo_files.checkpoint, demo_files.batch, config=demo_files.config, hash_checkpoint=False)
