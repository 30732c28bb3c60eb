"""Options, callbacks and file helpers shared by the ``hubarches`` commands.

Kept apart from :mod:`hubarches.cli` so that module holds only the commands and the error
boundary. Reading and writing ``.h5ad`` files lives here because the CLI is the only place
that touches the user's files by path.
"""

from __future__ import annotations

import errno
import os
import shlex
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from hubarches import cli_render as render
from hubarches.errors import BundleExistsError, DataError, RegistryError

if TYPE_CHECKING:
    import anndata as ad

    from hubarches.registry import Registry

__all__ = [
    "check_device",
    "choices",
    "device_option",
    "echo_json",
    "json_option",
    "offline_option",
    "open_registry",
    "parse_covariate_keys",
    "quiet_option",
    "read_h5ad",
    "registry_option",
    "registry_suffix",
    "require_absent",
    "require_parent",
    "stream_from_disk",
]

F = TypeVar("F", bound=Callable[..., Any])

BACKED_MIN_BYTES = 2 * 1024**3
"""Queries whose file is larger than this are streamed from disk unless --in-memory is given."""


def choices(literal: Any) -> click.Choice:
    """Make a click choice of the values of a ``Literal`` type (the allowed settings)."""
    return click.Choice(list(typing.get_args(literal)))


def registry_option(f: F) -> F:
    """``--registry/-r``: which registry a command reads or publishes to."""
    return click.option(
        "--registry",
        "-r",
        metavar="PATH|hf|hf://HOST",
        default=None,
        help="Registry to use: a directory, 'hf' (the Hugging Face Hub) or 'hf://HOST' (a "
        "Hub-compatible endpoint). Defaults to $HUBARCHES_REGISTRY, else "
        "~/.local/share/hubarches/registry; local registries also see the demo atlases.",
    )(f)


def json_option(f: F) -> F:
    """``--json``: print one JSON document instead of text."""
    return click.option(
        "--json", "as_json", is_flag=True, help="Print one machine-readable JSON document."
    )(f)


def quiet_option(f: F) -> F:
    """``--quiet/-q``: no progress bars."""
    return click.option(
        "--quiet",
        "-q",
        is_flag=True,
        help="No progress bars (they are off anyway when stderr is not a terminal).",
    )(f)


def offline_option(f: F) -> F:
    """``--offline``: resolve pinned versions from the cache, without the network."""
    return click.option(
        "--offline",
        is_flag=True,
        help="Do not contact a remote registry; pinned versions come from the cache.",
    )(f)


def check_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Accept 'auto' or a torch device that exists here."""
    if value == "auto":
        return value
    import torch

    try:
        device = torch.device(value)
    except RuntimeError as err:
        raise click.BadParameter(f"{value!r} is not a torch device (try cpu or cuda)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available on this machine; use cpu or auto")
    return value


def device_option(f: F) -> F:
    """``--device``: where training runs."""
    return click.option(
        "--device",
        default="auto",
        callback=check_device,
        help="Where to train: auto (CUDA when available), cpu, cuda or cuda:N.",
    )(f)


def open_registry(registry: str | None, *, quiet: bool = False) -> Registry:
    """Open the registry an option names; keep the Hub client's bars off when ours are.

    A local registry that names an existing file is refused, naming the option or variable
    that said so (:func:`~hubarches.registry.select.get_registry` refuses it too).
    """
    from hubarches.registry.local import LocalRegistry
    from hubarches.registry.select import ENV_REGISTRY, get_registry, names_hub

    value = registry if registry is not None else os.environ.get(ENV_REGISTRY)
    if value and not names_hub(value) and Path(value).expanduser().is_file():
        source = "--registry" if registry is not None else f"${ENV_REGISTRY}"
        raise RegistryError(
            f"{source} names {Path(value).expanduser().absolute()}, which is a file, not a "
            "directory",
            hint="Name a directory (created on the first push), 'hf' or 'hf://HOST'",
        )
    reg = get_registry(registry)  # refuses a file named by the default too
    if not isinstance(reg, LocalRegistry) and not render.progress_enabled(
        quiet=quiet, stream=sys.stderr
    ):
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    return reg


def registry_suffix(registry: str | None) -> str:
    """`` --registry X`` for commands we suggest, when the user named one."""
    return f" --registry {shlex.quote(registry)}" if registry else ""


def read_h5ad(path: Path, *, what: str, backed: bool = False) -> ad.AnnData:
    """Read an ``.h5ad`` file: a missing one is an OSError, an unreadable one a DataError.

    ``backed`` leaves the matrices on disk (the pipeline then streams them block by block).
    """
    import anndata as ad

    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as err:
        raise DataError(
            f"cannot read the {what} {path} as an .h5ad file "
            f"({type(err).__name__}: {render.one_line(err)})",
            hint="Pass an AnnData file written by anndata's write_h5ad; if it was copied, "
            "copy it again",
        ) from err


def stream_from_disk(path: Path, choice: bool | None) -> bool:
    """Whether to read a query backed: as asked, else when its file exceeds the threshold."""
    if choice is not None:
        return choice
    try:
        return path.stat().st_size > BACKED_MIN_BYTES
    except OSError:
        return False  # reading it reports the problem


def require_parent(path: Path) -> None:
    """Fail before any work when an output file's directory does not exist."""
    if not path.parent.is_dir():
        raise FileNotFoundError(
            errno.ENOENT, "its directory does not exist; create it first", str(path)
        )


def require_absent(path: Path | None) -> None:
    """Fail before training, not after, when a bundle directory would be overwritten."""
    if path is not None and path.exists():
        raise BundleExistsError(str(path))


def echo_json(document: dict[str, Any]) -> None:
    """Print a JSON document on stdout."""
    click.echo(render.json_document(document))


def parse_covariate_keys(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, str]:
    """``KEY=COLUMN`` pairs into a dict."""
    out: dict[str, str] = {}
    for value in values:
        key, sep, column = value.partition("=")
        if not sep or not key or not column:
            raise click.BadParameter(f"{value!r} is not KEY=COLUMN")
        out[key] = column
    return out
