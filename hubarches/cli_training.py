"""The commands that train: ``map`` (query training after surgery) and ``train`` (a reference).

They read the user's ``.h5ad``, call :mod:`hubarches.pipeline` with a progress bar, write the
outputs, optionally publish, and render a summary or a JSON document. Errors propagate to the
boundary in :mod:`hubarches.cli`.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from hubarches import cli_options as opt
from hubarches import cli_render as render
from hubarches.config import Dispersion, Injection, Likelihood, ModelConfig, TrainOptions
from hubarches.errors import PushError
from hubarches.labels import DEFAULT_K, DEFAULT_UNCERTAINTY_THRESHOLD, MAPPING_QUALITY_THRESHOLD

__all__ = ["EARLY_STOPPING_PATIENCE", "EARLY_STOPPING_VALIDATION", "map_command", "train_command"]

EARLY_STOPPING_PATIENCE = 45
"""Epochs without a better validation loss before ``train --early-stopping`` stops (scvi-tools')."""
EARLY_STOPPING_VALIDATION = 0.1
"""Share of cells held out to watch the validation loss with ``--early-stopping``."""
_DEFAULTS = ModelConfig(n_genes=1, covariate_sizes=(1,))
_TRAIN_DEFAULTS = TrainOptions()
_EPOCHS_DEFAULT = "400 up to 20,000 cells, fewer above"


def _next_step_after_map(
    *, name: str | None, saved: Path | None, pushed: bool, registry: str | None
) -> str | None:
    """Say what to do with the extended model, as a command to copy."""
    if pushed:
        return None
    target = name or "ORG/NAME"
    if saved is not None:
        return (
            f"publish the extended model: hubarches push {shlex.quote(str(saved))} {target}"
            f"{opt.registry_suffix(registry)}"
        )
    return "to keep the extended model, rerun with --save-model DIR" + (
        f", or with --push to publish it as the next version of {name}" if name else ""
    )


@click.command("map")
@click.argument("ref")
@click.argument("query", type=click.Path(path_type=Path, dir_okay=True))
@click.option("--batch-key", required=True, help="obs column of the query's batches (samples).")
@click.option(
    "--out",
    "-o",
    "out",
    required=True,
    type=click.Path(path_type=Path),
    help="Where to write the mapped .h5ad (replaced if it exists; never the query itself).",
)
@click.option("--layer", default=None, show_default="X", help="Layer holding raw counts.")
@click.option(
    "--gene-key", default=None, show_default="var_names", help="var column of gene ids to match."
)
@click.option(
    "--covariate-key",
    "covariate_keys",
    multiple=True,
    metavar="KEY=COLUMN",
    callback=opt.parse_covariate_keys,
    help="Read the reference's covariate KEY from obs column COLUMN (repeatable); by default "
    "each covariate is read from the column of its own name.",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=0),
    default=None,
    show_default=_EPOCHS_DEFAULT,
    help="Query training epochs.",
)
@click.option("--seed", type=int, default=0, help="Random seed of query training.")
@click.option("--batch-size", type=click.IntRange(min=2), default=128, help="Cells per minibatch.")
@click.option(
    "--k", "k", type=click.IntRange(min=1), default=DEFAULT_K, help="Neighbours of label transfer."
)
@click.option(
    "--uncertainty-threshold",
    type=click.FloatRange(0.0, 1.0),
    default=DEFAULT_UNCERTAINTY_THRESHOLD,
    help="Cells whose label uncertainty exceeds this are labelled Unknown.",
)
@click.option(
    "--quality-threshold",
    type=click.FloatRange(min=0.0, min_open=True),
    default=MAPPING_QUALITY_THRESHOLD,
    help="Flag cells whose distance to their reference neighbours exceeds this multiple "
    "of those neighbours' own spacing (and call them Unknown).",
)
@click.option(
    "--backed/--in-memory",
    "backed_choice",
    default=None,
    show_default=f"backed above {opt.BACKED_MIN_BYTES // 1024**3} GiB",
    help="Stream the query's counts from disk block by block instead of loading them.",
)
@opt.device_option
@click.option(
    "--save-model",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the extended model as a bundle to this new directory.",
)
@click.option(
    "--push",
    "push_model",
    is_flag=True,
    help="Publish the extended model as the next version of REF's atlas.",
)
@opt.registry_option
@opt.offline_option
@opt.json_option
@opt.quiet_option
def map_command(
    ref: str,
    query: Path,
    batch_key: str,
    out: Path,
    layer: str | None,
    gene_key: str | None,
    covariate_keys: dict[str, str],
    epochs: int | None,
    seed: int,
    batch_size: int,
    k: int,
    uncertainty_threshold: float,
    quality_threshold: float,
    backed_choice: bool | None,
    device: str,
    save_model: Path | None,
    push_model: bool,
    registry: str | None,
    offline: bool,
    as_json: bool,
    quiet: bool,
) -> None:
    """Map QUERY (an .h5ad of raw counts) onto REF with scArches surgery.

    Aligns the query's genes to the reference, adds its new batches by surgery, trains only
    the new weights, embeds every cell and transfers the reference's labels. MAPPED.h5ad
    keeps the query's cells and obs and adds the latent (obsm["X_hubarches"]), labels with
    their uncertainty and a mapping-quality score (obs["hubarches_*"]) and the mapping report
    (uns["hubarches"]). REF may also be a bundle directory.
    """
    from hubarches import pipeline
    from hubarches.io import write_mapped

    if out.exists() and query.exists() and out.resolve() == query.resolve():
        raise click.BadParameter("would overwrite the query; pass another path", param_hint="--out")
    opt.require_parent(out)
    opt.require_absent(save_model)
    reg = opt.open_registry(registry, quiet=quiet)
    reference = pipeline.load_reference(ref, reg, offline=offline)
    if push_model and reference.name is None:
        raise PushError(
            f"{ref} is not a published reference, so its extension has no atlas to join",
            hint="Use --save-model DIR, then `hubarches push DIR ORG/NAME`",
        )
    backed = opt.stream_from_disk(query, backed_choice)
    adata = opt.read_h5ad(query, what="query", backed=backed)
    show = render.progress_enabled(quiet=quiet, stream=sys.stderr)
    with render.EpochBar("Query training", enabled=show, stream=sys.stderr) as bar:
        result = pipeline.map_query(
            reference,
            adata,
            batch_key=batch_key,
            epochs=epochs,
            seed=seed,
            batch_size=batch_size,
            layer=layer,
            gene_key=gene_key,
            covariate_keys=covariate_keys or None,
            k=k,
            uncertainty_threshold=uncertainty_threshold,
            quality_threshold=quality_threshold,
            device=device,
            progress=bar,
        )
    write_mapped(result.adata, out, source=query if backed else None)
    if backed:
        adata.file.close()
    if save_model is not None:
        result.reference.save(save_model)
    published = None
    if push_model:
        assert reference.name is not None  # checked above
        published = render.Published(
            pipeline.push(result.reference, reference.name, reg), reg.location
        )
    if as_json:
        opt.echo_json(
            render.map_document(result, output=out, saved_model=save_model, published=published)
        )
        return
    hint = _next_step_after_map(
        name=reference.name, saved=save_model, pushed=published is not None, registry=registry
    )
    click.echo(
        render.render_map(
            result, output=out, saved_model=save_model, published=published, push_hint=hint
        )
    )


@click.command("train")
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--batch-key", required=True, help="obs column of the atlas' batches (samples).")
@click.option(
    "--name",
    required=True,
    metavar="ORG/NAME",
    help="Atlas name to publish under; checked now, used by --push and the push command "
    "printed at the end (a manifest gets its name only when published).",
)
@click.option(
    "--out",
    "-o",
    "out",
    required=True,
    type=click.Path(path_type=Path),
    help="New directory to write the bundle to.",
)
@click.option("--label-key", default=None, help="obs column of cell labels to transfer to queries.")
@click.option(
    "--extra-covariate",
    "extra_covariates",
    multiple=True,
    metavar="KEY",
    help="Another categorical obs column to condition on (repeatable).",
)
@click.option("--layer", default=None, show_default="X", help="Layer holding raw counts.")
@click.option(
    "--gene-key", default=None, show_default="var_names", help="var column of gene ids to use."
)
@click.option(
    "--n-latent", type=click.IntRange(min=1), default=_DEFAULTS.n_latent, help="Latent dimensions."
)
@click.option(
    "--n-hidden",
    type=click.IntRange(min=1),
    default=_DEFAULTS.n_hidden,
    help="Units per hidden layer.",
)
@click.option(
    "--n-layers",
    type=click.IntRange(1, 3),
    default=_DEFAULTS.n_layers,
    help="Hidden layers of the encoder and of the decoder.",
)
@click.option(
    "--dropout",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=_DEFAULTS.dropout,
    help="Dropout rate of the hidden layers.",
)
@click.option(
    "--likelihood",
    type=opt.choices(Likelihood),
    default=_DEFAULTS.likelihood,
    help="Count distribution of the decoder.",
)
@click.option(
    "--dispersion",
    type=opt.choices(Dispersion),
    default=_DEFAULTS.dispersion,
    help="Inverse dispersion per gene, or per gene and batch.",
)
@click.option(
    "--covariate-injection",
    type=opt.choices(Injection),
    default=_DEFAULTS.covariate_injection,
    help="Covariates enter the first hidden layer only, or all of them.",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=None,
    show_default=_EPOCHS_DEFAULT,
    help="Training epochs.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=2),
    default=_TRAIN_DEFAULTS.batch_size,
    help="Cells per minibatch.",
)
@click.option(
    "--lr",
    type=click.FloatRange(min=0.0, min_open=True),
    default=_TRAIN_DEFAULTS.lr,
    help="Learning rate (Adam).",
)
@click.option("--seed", type=int, default=0, help="Random seed of initialization and training.")
@click.option(
    "--early-stopping",
    is_flag=True,
    help=f"Hold out {EARLY_STOPPING_VALIDATION:.0%} of cells and stop after "
    f"{EARLY_STOPPING_PATIENCE} epochs without a better validation loss.",
)
@click.option(
    "--description", default="", show_default=False, help="What the atlas is (goes into its card)."
)
@click.option(
    "--license",
    "license_",
    default="cc-by-4.0",
    help="License of the weights, as on the Hugging Face Hub.",
)
@click.option("--citation", default="", show_default=False, help="How to cite the atlas.")
@opt.device_option
@click.option(
    "--push",
    "push_model",
    is_flag=True,
    help="Publish the bundle as the next version of --name right away.",
)
@opt.registry_option
@opt.json_option
@opt.quiet_option
def train_command(
    data: Path,
    batch_key: str,
    name: str,
    out: Path,
    label_key: str | None,
    extra_covariates: tuple[str, ...],
    layer: str | None,
    gene_key: str | None,
    n_latent: int,
    n_hidden: int,
    n_layers: int,
    dropout: float,
    likelihood: str,
    dispersion: str,
    covariate_injection: str,
    epochs: int | None,
    batch_size: int,
    lr: float,
    seed: int,
    early_stopping: bool,
    description: str,
    license_: str,
    citation: str,
    device: str,
    push_model: bool,
    registry: str | None,
    as_json: bool,
    quiet: bool,
) -> None:
    """Train a reference on DATA (raw counts in .h5ad) into a bundle.

    Writes the bundle (weights, manifest, model card, reference embedding) to the new
    directory --out. A manifest gets its name only when published: run the printed
    `hubarches push OUT ORG/NAME` after checking it (`hubarches info OUT`), or pass --push.
    """
    from hubarches import pipeline
    from hubarches.manifest import MANIFEST_FILE, read_manifest
    from hubarches.registry import validate_name

    validate_name(name)
    opt.require_absent(out)
    opt.require_parent(out)
    reg = opt.open_registry(registry, quiet=quiet) if push_model else None
    adata = opt.read_h5ad(data, what="atlas")
    options = TrainOptions(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
        early_stopping_patience=EARLY_STOPPING_PATIENCE if early_stopping else None,
        validation_fraction=EARLY_STOPPING_VALIDATION if early_stopping else 0.0,
    )
    config = {
        "n_latent": n_latent,
        "n_hidden": n_hidden,
        "n_layers": n_layers,
        "dropout": dropout,
        "likelihood": likelihood,
        "dispersion": dispersion,
        "covariate_injection": covariate_injection,
    }
    show = render.progress_enabled(quiet=quiet, stream=sys.stderr)
    with render.EpochBar("Training", enabled=show, stream=sys.stderr) as bar:
        result = pipeline.train_atlas(
            adata,
            batch_key=batch_key,
            extra_covariates=extra_covariates,
            label_key=label_key,
            layer=layer,
            gene_key=gene_key,
            config=config,
            options=options,
            description=description,
            license=license_,
            citation=citation,
            progress=bar,
        )
    result.reference.save(out)
    written = read_manifest(out / MANIFEST_FILE)  # as saved: with its files and their sizes
    published = None
    if reg is not None:
        published = render.Published(pipeline.push(out, name, reg), reg.location)
    if as_json:
        opt.echo_json(
            render.train_document(
                result, manifest=written, bundle=out, name=name, published=published
            )
        )
        return
    hint = (
        None
        if published is not None
        else f"publish it: hubarches push {shlex.quote(str(out))} {name}"
        f"{opt.registry_suffix(registry)}"
    )
    click.echo(
        render.render_train(
            result, manifest=written, bundle=out, name=name, published=published, push_hint=hint
        )
    )
