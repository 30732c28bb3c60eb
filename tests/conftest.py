"""Shared fixtures. Every test runs with its registry, cache, HF home and XDG dirs isolated."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hf_constants

from hubarches.bundle import write_bundle
from hubarches.config import ModelConfig
from hubarches.manifest import Manifest

# Environment variables that would let a test read or write the user's real state, or reach
# a real Hub with the user's credentials.
_CLEARED_ENV = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HF_ENDPOINT",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "HF_XET_CACHE",
    "HUBARCHES_DEBUG",
)


@dataclass(frozen=True)
class IsolatedEnv:
    """Where the isolated registry, cache and Hugging Face home of a test live."""

    registry: Path
    cache: Path
    hf_home: Path
    data_home: Path


@pytest.fixture(autouse=True)
def isolated_env(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> IsolatedEnv:
    """Point HUBARCHES_REGISTRY/CACHE, HF_HOME and the XDG dirs at a fresh temp dir."""
    base = tmp_path_factory.mktemp("env")
    env = IsolatedEnv(
        registry=base / "registry",
        cache=base / "cache",
        hf_home=base / "hf",
        data_home=base / "xdg-data",
    )
    for name in _CLEARED_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HUBARCHES_REGISTRY", str(env.registry))
    monkeypatch.setenv("HUBARCHES_CACHE", str(env.cache))
    monkeypatch.setenv("HF_HOME", str(env.hf_home))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("XDG_DATA_HOME", str(env.data_home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(base / "xdg-cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(base / "xdg-config"))
    # huggingface_hub reads these paths once, at import: patch its copies as well.
    for attr, value in (
        ("HF_HOME", env.hf_home),
        ("HF_HUB_CACHE", env.hf_home / "hub"),
        ("HUGGINGFACE_HUB_CACHE", env.hf_home / "hub"),
        ("HF_TOKEN_PATH", env.hf_home / "token"),
        ("HF_STORED_TOKENS_PATH", env.hf_home / "stored_tokens"),
    ):
        monkeypatch.setattr(hf_constants, attr, str(value), raising=False)
    return env


# --- bundles ----------------------------------------------------------------------------------


@pytest.fixture
def make_manifest() -> Callable[..., Manifest]:
    """Build a small valid Manifest; keyword arguments override its fields."""

    def make(
        *, n_genes: int = 6, batches: tuple[str, ...] = ("b0", "b1"), **fields: object
    ) -> Manifest:
        config = ModelConfig(n_genes=n_genes, covariate_sizes=(len(batches),), n_hidden=8)
        return Manifest.from_model_config(
            config,
            genes=[f"G{i}" for i in range(n_genes)],
            covariates={"batch": batches},
            **fields,
        )

    return make


@pytest.fixture
def make_bundle(
    tmp_path: Path, make_manifest: Callable[..., Manifest]
) -> Callable[..., tuple[Path, Manifest]]:
    """Write a small bundle of random weights; returns (path, final manifest)."""
    counter = iter(range(1_000_000))

    def make(dest: Path | None = None, *, seed: int = 0, **fields: object) -> tuple[Path, Manifest]:
        gen = torch.Generator().manual_seed(seed)
        weights = {
            "encoder.weight": torch.randn(8, 6, generator=gen),
            "encoder.bias": torch.randn(8, generator=gen),
            "px_r": torch.randn(6, generator=gen),
        }
        dest = dest if dest is not None else tmp_path / f"bundle-{next(counter)}"
        return dest, write_bundle(dest, make_manifest(**fields), weights)

    return make
