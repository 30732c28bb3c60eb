"""Writing mapped AnnData files: atomically, and without loading a backed input's matrix."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

import anndata as ad
import h5py

__all__ = ["write_mapped"]

COPIED_FROM_SOURCE = ("X", "layers")
"""Groups of a backed input copied into the output file by HDF5 itself, block by block."""


def write_mapped(
    adata: ad.AnnData, path: str | os.PathLike[str], *, source: str | os.PathLike[str] | None
) -> Path:
    """Write a mapping's output ``.h5ad`` atomically; a half-written file is never visible.

    When ``adata`` has no X (the query was streamed from ``source``, a backed ``.h5ad``),
    the source's X and layers are copied into the new file by h5py without passing
    through memory.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    # Created with the user's umask (not mkstemp's 0600), like any file the user writes.
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        adata.write_h5ad(tmp)
        if adata.X is None and source is not None:
            with h5py.File(source, "r") as src, h5py.File(tmp, "r+") as dst:
                for name in COPIED_FROM_SOURCE:
                    if name in src:
                        if name in dst:
                            del dst[name]
                        src.copy(src[name], dst, name=name)
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return path
