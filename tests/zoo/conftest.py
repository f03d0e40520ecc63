"""Fixtures of the zoo tests: one thread while training, and one built store per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from camserve.zoo.build import BuildConfig, build, config_hash
from camserve.zoo.store import read_manifest

REPO_STORE = Path(__file__).resolve().parents[2] / "model_store"


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """Training on one thread: two threads stall on each other on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _matches(store: Path, cfg: BuildConfig) -> bool:
    try:
        info, entries = read_manifest(store)
    except Exception:
        return False
    return info.get("config_hash") == config_hash(cfg.seeded()) and all(
        (store / e.state_dict).is_file() for e in entries.values())


@pytest.fixture(scope="session")
def zoo_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's model_store/ when it holds this build, else a fresh build (minutes)."""
    cfg = BuildConfig()
    if _matches(REPO_STORE, cfg):
        return REPO_STORE
    out = tmp_path_factory.mktemp("model_store")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build(out, cfg)
    finally:
        torch.set_num_threads(before)
    return out
