"""The ``hubarches`` command line: pull, map, push, train, info and list.

Each command parses its options, calls the pipeline and renders the result object
(:mod:`hubarches.cli_render`); nothing else prints. The group's ``main`` is the single error
boundary: a :class:`~hubarches.errors.HubarchesError` or an unreadable file becomes one line
on stderr and exit code 1, a usage error exit code 2, an interrupt 130; a traceback is shown
only with ``HUBARCHES_DEBUG=1``. :class:`~hubarches.errors.HubarchesWarning` s are shown as
one ``warning: …`` line each; other libraries' warnings, and their log records below ERROR
(the Hub client's retry messages), only in debug mode.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from hubarches import cli_options as opt
from hubarches import cli_render as render
from hubarches._version import __version__
from hubarches.cli_training import map_command, train_command
from hubarches.errors import HubarchesError, HubarchesWarning

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_USAGE", "cli", "main"]

ENV_DEBUG = "HUBARCHES_DEBUG"
"""Set to 1 to see tracebacks, debug logs and every library's warnings."""
EXIT_ERROR = 1
"""Exit code of a user error: a bad reference, unusable data, a failed push, a missing file."""
EXIT_USAGE = 2
"""Exit code of a command line that does not parse (click's convention)."""
EXIT_INTERRUPTED = 130
"""Exit code after Ctrl-C (128 + SIGINT), as shells report it."""
BUG_HINT = "This looks like a bug in hubarches: rerun with HUBARCHES_DEBUG=1 and report the output"
QUIET_LOGGERS = ("huggingface_hub", "httpx", "httpx2", "httpcore", "urllib3", "filelock")
"""Libraries whose log records below ERROR are hidden outside debug mode.

The Hub client logs each retry of a failed request as a warning (two lines per try, five
tries); the error line that ends the command already says what failed and what to do.
"""

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}


# --- the error boundary ---------------------------------------------------------------------


def _debug() -> bool:
    return os.environ.get(ENV_DEBUG, "").strip().lower() in {"1", "true", "yes", "on"}


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """Render a HubarchesWarning as one ``warning:`` line; others as Python would."""
    if issubclass(category, HubarchesWarning):
        click.echo(f"warning: {render.one_line(message)}", err=True)
    else:
        click.echo(
            warnings.formatwarning(message, category, filename, lineno, line).rstrip(), err=True
        )


def _error_line(err: BaseException) -> str:
    """Explain an error in one line that says what to do."""
    kind = type(err).__name__
    if isinstance(err, HubarchesError):
        return f"error ({kind}): {render.one_line(err)}"
    if isinstance(err, OSError):
        what = err.strerror or str(err)
        where = f"{err.filename}: " if err.filename else ""
        return (
            f"error ({kind}): {render.one_line(where + what)}. Check the path and its permissions"
        )
    return f"error ({kind}): {render.one_line(err) or kind}. {BUG_HINT}"


def _usage_line(err: click.UsageError) -> str:
    command = err.ctx.command_path if err.ctx is not None else "hubarches"
    message = render.one_line(err.format_message()).rstrip(".")
    return f"error (usage): {message}. See '{command} --help'"


def _quiet_libraries() -> dict[logging.Logger, int]:
    """Raise the :data:`QUIET_LOGGERS` to ERROR; return their levels to restore."""
    # huggingface_hub sets its logger's level when this module is first imported, which
    # would undo ours if a command imported it later; importing it first is cheap.
    import huggingface_hub.utils.logging  # noqa: F401

    saved: dict[logging.Logger, int] = {}
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        saved[logger] = logger.level
        if logger.getEffectiveLevel() < logging.ERROR:
            logger.setLevel(logging.ERROR)
    return saved


def _guarded(invoke: Callable[[], Any]) -> int:
    """Run a command and turn whatever it raises into one line and an exit code."""
    debug = _debug()
    handler = logging.StreamHandler(sys.stderr) if debug else None
    package_logger = logging.getLogger("hubarches")
    level = package_logger.level
    if handler is not None:
        package_logger.addHandler(handler)
        package_logger.setLevel(logging.DEBUG)
    library_levels = {} if debug else _quiet_libraries()
    with warnings.catch_warnings():
        warnings.simplefilter("default" if debug else "ignore")
        warnings.simplefilter("default", HubarchesWarning)
        warnings.showwarning = _show_warning
        try:
            code = invoke()
            return code if isinstance(code, int) else 0
        except click.UsageError as err:
            if type(err).__name__ == "NoArgsIsHelpError" and err.ctx is not None:
                click.echo(err.ctx.get_help())  # plain `hubarches`: show the help
            else:
                click.echo(_usage_line(err), err=True)
            return EXIT_USAGE
        except click.ClickException as err:  # e.g. FileError from click's own file handling
            click.echo(f"error: {render.one_line(err.format_message())}", err=True)
            return err.exit_code or EXIT_ERROR
        except (click.Abort, KeyboardInterrupt):
            click.echo("error (interrupted): stopped before it finished", err=True)
            return EXIT_INTERRUPTED
        except Exception as err:
            if debug:
                traceback.print_exc(file=sys.stderr)
            click.echo(_error_line(err), err=True)
            return EXIT_ERROR
        finally:
            if handler is not None:
                package_logger.removeHandler(handler)
                package_logger.setLevel(level)
            for logger, saved in library_levels.items():
                logger.setLevel(saved)


class _Group(click.Group):
    """The command group whose ``main`` is the error boundary (also under ``CliRunner``)."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """Run the command line; exit with its code, or return it when not standalone."""
        code = _guarded(
            lambda: super(_Group, self).main(
                args, prog_name or "hubarches", complete_var, standalone_mode=False, **extra
            )
        )
        if standalone_mode:
            sys.exit(code)
        return code


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hubarches`` script; returns the exit code."""
    return cli.main(args=argv, standalone_mode=False)


# --- commands -------------------------------------------------------------------------------


EXAMPLES = """\b
Examples (the demo atlas ships with hubarches):
  hubarches list
  hubarches pull hubarches/demo
  hubarches map hubarches/demo query.h5ad --batch-key batch --out mapped.h5ad --save-model ext
  hubarches push ext hubarches/demo --registry ./my-registry
"""


@click.group("hubarches", cls=_Group, context_settings=CONTEXT, epilog=EXAMPLES)
@click.version_option(__version__, "--version", "-V", prog_name="hubarches")
def cli() -> None:
    """Share single-cell reference atlases and map data onto them (scArches).

    Pull a published reference, map your query data onto it (architectural surgery, label
    transfer), and push the extended model back as the next version of the atlas.

    REF is org/name (the latest version), org/name@N or org/name@sha256:<digest>.
    Set HUBARCHES_DEBUG=1 to see tracebacks.
    """


@cli.command()
@click.argument("ref")
@opt.registry_option
@opt.offline_option
@opt.json_option
@opt.quiet_option
def pull(ref: str, registry: str | None, offline: bool, as_json: bool, quiet: bool) -> None:
    """Download REF into the cache, verify it and show what it is."""
    from hubarches.cache import pull as pull_bundle

    reg = opt.open_registry(registry, quiet=quiet)
    pulled = pull_bundle(ref, reg, offline=offline)
    if as_json:
        opt.echo_json(
            {
                **render.version_document(pulled.info, registry=reg.location),
                "path": str(pulled.path),
                "manifest": render.manifest_document(pulled.manifest),
            }
        )
    else:
        click.echo(render.render_pull(pulled))


@cli.command()
@click.argument("ref")
@opt.registry_option
@opt.offline_option
@opt.json_option
def info(ref: str, registry: str | None, offline: bool, as_json: bool) -> None:
    """Show the manifest of REF and the atlas' versions.

    REF may also be a bundle directory (e.g. written by `train --out`), which is verified.
    """
    from hubarches.bundle import verify_bundle
    from hubarches.cache import pull as pull_bundle
    from hubarches.manifest import MANIFEST_FILE, manifest_digest, read_manifest
    from hubarches.registry import parse_ref
    from hubarches.registry.local import LocalRegistry

    bundle = Path(ref)
    versions: list = []
    location = None
    if (bundle / MANIFEST_FILE).is_file():
        manifest = verify_bundle(bundle)
        digest, path = manifest_digest(manifest), bundle
    else:
        reg = opt.open_registry(registry, quiet=True)
        location = reg.location
        spec = parse_ref(ref)
        if isinstance(reg, LocalRegistry):  # read in place: no need to copy into the cache
            found = reg.resolve(spec)
            path = reg.version_path(found)
            manifest = read_manifest(path / MANIFEST_FILE)
        else:
            pulled = pull_bundle(spec, reg, offline=offline)
            found, path, manifest = pulled.info, pulled.path, pulled.manifest
        digest = found.digest
        versions = reg.list_versions(spec.name)
    if as_json:
        opt.echo_json(
            {
                "name": manifest.name,
                "version": manifest.version,
                "digest": digest,
                "path": str(path),
                "registry": location,
                "versions": [render.version_document(v) for v in versions],
                "manifest": render.manifest_document(manifest),
            }
        )
    else:
        click.echo(render.render_info(manifest, digest=digest, versions=versions, path=path))


@cli.command("list")
@opt.registry_option
@opt.json_option
def list_atlases(registry: str | None, as_json: bool) -> None:
    """List the atlases in a registry and their versions."""
    reg = opt.open_registry(registry, quiet=True)
    atlases = {name: reg.list_versions(name) for name in reg.list_atlases()}
    if as_json:
        opt.echo_json(
            {
                "registry": reg.location,
                "atlases": [
                    {
                        "name": name,
                        "latest": versions[-1].version if versions else None,
                        "versions": [render.version_document(v) for v in versions],
                    }
                    for name, versions in atlases.items()
                ],
            }
        )
    else:
        click.echo(render.render_list(reg.location, atlases))


@cli.command()
@click.argument("bundle_dir", metavar="DIR", type=click.Path(path_type=Path))
@click.argument("name", metavar="ORG/NAME")
@opt.registry_option
@opt.json_option
@opt.quiet_option
def push(bundle_dir: Path, name: str, registry: str | None, as_json: bool, quiet: bool) -> None:
    """Publish the bundle in DIR as the next version of ORG/NAME.

    DIR is what `train --out` or `map --save-model` wrote. The registry assigns the version
    number; published versions never change.
    """
    from hubarches.pipeline import push as push_bundle

    reg = opt.open_registry(registry, quiet=quiet)
    published = push_bundle(bundle_dir, name, reg)
    if as_json:
        opt.echo_json(render.version_document(published, registry=reg.location))
    else:
        click.echo(render.render_push(published, registry=reg.location, registry_option=registry))


cli.add_command(map_command)
cli.add_command(train_command)
