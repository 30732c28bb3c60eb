"""Which registry to use: an argument, else ``HUBARCHES_REGISTRY``, else a per-user default.

A path means a local registry; ``"hf"`` or ``"hf://<endpoint>"`` means the Hugging Face Hub
(write a local directory called ``hf`` as ``./hf``). Local registries fall back, read-only,
to the demo atlases shipped with hubarches, which therefore always resolve; pushes never go
there.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
from pathlib import Path

from hubarches.errors import RegistryError
from hubarches.registry import Registry
from hubarches.registry.local import LocalRegistry

__all__ = [
    "ENV_REGISTRY",
    "default_registry_path",
    "demo_registry",
    "demo_registry_path",
    "get_registry",
    "names_hub",
    "parse_hf_endpoint",
]

ENV_REGISTRY = "HUBARCHES_REGISTRY"
"""Environment variable naming the registry to use (a path, ``hf`` or ``hf://...``)."""
DEMO_PACKAGE = "hubarches.demo_registry"
"""The package the repository's top-level ``registry/`` folder is installed as."""
HF_SCHEME = "hf://"


def default_registry_path() -> Path:
    """``$XDG_DATA_HOME/hubarches/registry``, or ``~/.local/share/hubarches/registry``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path("~/.local/share").expanduser())
    return Path(base) / "hubarches" / "registry"


def demo_registry_path() -> Path | None:
    """Find the demo atlases, installed or in a source checkout; None if absent."""
    try:
        found = importlib.resources.files(DEMO_PACKAGE)
    except ModuleNotFoundError:
        found = None
    if isinstance(found, os.PathLike):
        return Path(found)
    if found is not None:  # a namespace package: a MultiplexedPath over its locations
        spec = importlib.util.find_spec(DEMO_PACKAGE)
        for location in (spec.submodule_search_locations or []) if spec else []:
            if Path(location).is_dir():
                return Path(location)
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "registry").is_dir():
        return checkout / "registry"
    return None


def demo_registry() -> LocalRegistry | None:
    """Open the demo atlases as a read-only local registry, or None if they are not installed."""
    path = demo_registry_path()
    return None if path is None else LocalRegistry(path, read_only=True)


def parse_hf_endpoint(value: str) -> str | None:
    """Return the Hub endpoint of ``"hf"`` (None: default) or ``"hf://host"`` (https://host)."""
    rest = value[len(HF_SCHEME) :] if value.startswith(HF_SCHEME) else ""
    if not rest:
        return None
    if rest.startswith(("http://", "https://")):
        return rest.rstrip("/")
    return "https://" + rest.rstrip("/")


def names_hub(value: str) -> bool:
    """Whether a registry string means the Hugging Face Hub (``hf`` or ``hf://...``)."""
    return value == "hf" or value.startswith(HF_SCHEME)


def get_registry(registry: str | os.PathLike[str] | Registry | None = None) -> Registry:
    """Open the registry an argument names; None means ``HUBARCHES_REGISTRY`` or the default.

    Local registries read through to the demo atlases; a registry object passes through.
    A path to an existing file is refused: it would read as an empty registry (every lookup
    falling through to the demo atlases) and fail only on push.
    """
    if registry is None:
        registry = os.environ.get(ENV_REGISTRY) or default_registry_path()
    if isinstance(registry, str) and names_hub(registry):
        from hubarches.registry.hf import HubRegistry  # only when the Hub is asked for

        return HubRegistry(endpoint=parse_hf_endpoint(registry))
    if isinstance(registry, (str, os.PathLike)):
        root = Path(registry).expanduser()
        if root.exists() and not root.is_dir():
            raise RegistryError(
                f"the registry {root} is a file, not a directory",
                hint="Name a directory (created on the first push), 'hf' or 'hf://HOST'",
            )
        demo = demo_registry()
        if demo is not None and demo.root.resolve() == root.resolve():
            demo = None  # the demo folder itself, named explicitly (e.g. to build it)
        return LocalRegistry(root, fallback=demo)
    if isinstance(registry, Registry):
        return registry
    raise TypeError(
        f"a registry is a path, 'hf', 'hf://<endpoint>' or a Registry, not {registry!r}"
    )
