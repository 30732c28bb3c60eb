"""The model card (a bundle's ``README.md``), rendered from its manifest.

The card opens with Hugging Face-style YAML front matter (license, ``library_name``, tags) so
the Hub shows it as the repository's README, then describes the architecture, genes and
covariates, training data, lineage, how to map a query onto the atlas, and the citation.
:data:`CARD_TEMPLATE` is the one source of the template; ``model_cards/template.md`` in the
repository is a copy kept equal to it by a test.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from string import Template

from hubarches.manifest import Categorical, Manifest

__all__ = ["CARD_TEMPLATE", "render_card"]

SHOWN_GENES = 10
"""Gene ids quoted in the card; the manifest has them all."""
SHOWN_CATEGORIES = 12
"""Categories quoted per covariate in the card."""
PLACEHOLDER_NAME = "org/name"
"""Stands in for the atlas name in a card rendered before publication."""

CARD_TEMPLATE = """\
---
license: ${license}
library_name: hubarches
tags:
${tags}
---

# ${title}

${description}

| | |
|---|---|
| Atlas | `${name}` |
| Version | ${version} |
| Model | `${kind}` (conditional VAE, scArches-ready) |
| Genes | ${n_genes} (${id_type}) |
| Covariates | ${covariate_keys} |
| Created | ${created} |
| Written by | hubarches ${written_by} |

## Architecture

| Setting | Value |
|---|---|
${architecture}

## Genes and covariates

${n_genes} genes, identified by ${id_type}, in model order: ${gene_preview}.
A query is reordered to this list; missing genes are zero-filled and extra genes dropped.

| Covariate | Categories | |
|---|---|---|
${covariate_rows}

${labels}

## Training data

${training}

## Lineage

${lineage}

## Mapping a query onto this atlas

The query needs raw counts and the `obs` column${covariate_plural} ${covariate_columns}.
New categories are added by architectural surgery; the reference's weights stay frozen.

```bash
hubarches map ${ref} query.h5ad --batch-key ${batch_key_shell} --out mapped.h5ad
```

```python
import hubarches

ref = hubarches.load_reference("${ref}")
mapped = ref.map(adata, batch_key=${batch_key_py})
```

## Files

| File | Size (bytes) | sha256 |
|---|---|---|
${files}

Every file is verified against these hashes before it is loaded; weights are safetensors.

## Citation

${citation}
"""


def _cell(text: object) -> str:
    """Text safe inside a Markdown table cell."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _preview(items: Sequence[str], limit: int) -> str:
    """Quote the first ``limit`` items as inline code, with a count of the rest."""
    shown = ", ".join(f"`{_cell(i)}`" for i in items[:limit])
    rest = len(items) - limit
    return f"{shown}, … ({rest} more)" if rest > 0 else shown


def _categorical_row(c: Categorical, note: str = "") -> str:
    preview = _preview(c.categories, SHOWN_CATEGORIES)
    return f"| `{_cell(c.key)}` | {len(c.categories)} | {preview}{note} |"


def _tags(m: Manifest) -> str:
    tags = ["single-cell", "scrna-seq", "scarches", "reference-atlas", m.model.kind]
    if m.lineage is not None:
        tags.append("extension")
    return "\n".join(f"- {t}" for t in tags)


def _training(m: Manifest) -> str:
    t = m.training
    if t is None:
        return "Not recorded."
    lines = [f"- Cells: {t.cells}", f"- Epochs: {t.epochs}"]
    if t.seed is not None:
        lines.append(f"- Seed: {t.seed}")
    if t.batch_size is not None:
        lines.append(f"- Batch size: {t.batch_size}")
    if t.learning_rate is not None:
        lines.append(f"- Learning rate: {t.learning_rate:g}")
    if t.final_losses:
        losses = ", ".join(f"{k} {v:.4g}" for k, v in t.final_losses.items())
        lines.append(f"- Final losses: {losses}")
    lines.extend(f"- {k}: {v}" for k, v in t.settings.items())
    return "\n".join(lines)


def _lineage(m: Manifest) -> str:
    if m.lineage is None:
        return "A root reference: trained from scratch, not extended from another version."
    p = m.lineage.parent
    lines = [
        f"Extended by scArches surgery from `{p.name}@{p.version}` (`sha256:{p.digest}`).",
    ]
    if m.lineage.added_categories:
        lines.append("")
        lines.append("Categories added by this version:")
        lines.extend(
            f"- `{key}`: {_preview(added, SHOWN_CATEGORIES)}"
            for key, added in m.lineage.added_categories.items()
        )
    return "\n".join(lines)


def render_card(manifest: Manifest) -> str:
    """Render the model card of a manifest (Markdown with YAML front matter)."""
    m = manifest
    name = m.name or PLACEHOLDER_NAME
    ref = m.ref or name
    keys = [c.key for c in m.covariates]
    arch = m.model.model_dump(exclude={"kind"})
    labels = (
        "Cell labels that can be transferred to a query:\n\n"
        "| Labels | Categories | |\n|---|---|---|\n" + _categorical_row(m.labels)
        if m.labels is not None
        else "This reference has no cell labels to transfer."
    )
    files = "\n".join(
        f"| `{_cell(f)}` | {e.size} | `{e.sha256}` |" for f, e in sorted(m.files.items())
    )
    return Template(CARD_TEMPLATE).substitute(
        license=json.dumps(m.license, ensure_ascii=False),
        tags=_tags(m),
        title=name if m.version is None else f"{name} (version {m.version})",
        description=m.description.strip() or "No description given.",
        name=_cell(name),
        version=m.version if m.version is not None else "unpublished",
        kind=m.model.kind,
        n_genes=len(m.genes.ids),
        id_type=m.genes.id_type,
        covariate_keys=", ".join(f"`{_cell(k)}`" for k in keys),
        created=m.created.isoformat().replace("+00:00", "Z"),
        written_by=_cell(m.written_by),
        architecture="\n".join(f"| {k} | {_cell(v)} |" for k, v in arch.items()),
        gene_preview=_preview(m.genes.ids, SHOWN_GENES),
        covariate_rows="\n".join(
            _categorical_row(c, " (batch key)" if i == 0 else "")
            for i, c in enumerate(m.covariates)
        ),
        labels=labels,
        training=_training(m),
        lineage=_lineage(m),
        covariate_plural="s" if len(keys) > 1 else "",
        covariate_columns=", ".join(f"`{k}`" for k in keys),
        ref=ref,
        batch_key_shell=shlex.quote(m.batch_key),
        batch_key_py=json.dumps(m.batch_key, ensure_ascii=False),
        files=files or "| (none yet) | | |",
        citation=m.citation.strip() or "No citation given.",
    )
