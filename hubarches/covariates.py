"""Categorical covariates of a query or an atlas: read from obs, compared as strings, coded.

The reference's categories keep their indices (their columns in every covariate-taking
layer); categories it lacks are appended, sorted, and become the new columns of surgery.
Missing values (NaN, None, empty or "nan"-like strings) are an error naming their count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from hubarches.errors import CovariateError

__all__ = ["CovariateEncoding", "encode_covariates", "obs_column", "require_values", "string_codes"]

_MISSING_STRINGS = frozenset({"", "nan", "none", "<na>"})
"""Strings that ``astype(str)`` makes of missing values, and empty ones: all missing."""


def _category_name(value: object) -> str:
    """Compare categories as strings; integral floats (1.0) read as integers (1)."""
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


def string_codes(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Factorize values as strings: codes into the unique names, -1 where a value is missing."""
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    names = [_category_name(u) for u in uniques]
    merged: dict[str, int] = {}
    remap = np.empty(len(names) + 1, dtype=np.int64)
    remap[-1] = -1
    for i, name in enumerate(names):
        if name.strip().lower() in _MISSING_STRINGS:
            remap[i] = -1
        else:
            remap[i] = merged.setdefault(name, len(merged))
    return remap[np.asarray(codes, dtype=np.int64)], list(merged)


def obs_column(obs: pd.DataFrame, column: str, *, key: str, role: str) -> pd.Series:
    """Return ``obs[column]`` or refuse, listing the columns there are."""
    if column not in obs.columns:
        columns = ", ".join(map(str, obs.columns)) or "none"
        raise CovariateError(
            f"obs has no column {column!r} for {role}",
            key=key,
            hint=f"obs columns: {columns}. Pass the column that holds it (batch_key=... for "
            "the batch, covariate_keys={...} for other covariates)",
        )
    return obs[column]


def require_values(codes: np.ndarray, *, column: str, key: str, role: str) -> None:
    """Refuse missing covariate values, with their count."""
    n_missing = int(np.count_nonzero(codes < 0))
    if n_missing:
        raise CovariateError(
            f"obs[{column!r}] ({role}) has {n_missing} of {len(codes)} cells with a missing "
            "value (NaN or empty)",
            key=key,
            hint=f"Give those cells a category (e.g. fill obs[{column!r}] with 'unknown') or "
            "drop them",
        )


@dataclass(frozen=True, eq=False)
class CovariateEncoding:
    """Integer codes of the reference's categorical covariates for each query cell."""

    keys: tuple[str, ...]
    columns: tuple[str, ...]
    categories: tuple[tuple[str, ...], ...]
    new_categories: dict[str, tuple[str, ...]]
    codes: np.ndarray = field(repr=False)


def encode_covariates(
    obs: pd.DataFrame,
    reference: Sequence[tuple[str, Sequence[str]]],
    *,
    columns: Mapping[str, str] | None = None,
) -> CovariateEncoding:
    """Encode each reference covariate; known categories keep their index, new ones follow.

    ``reference`` is ``[(key, categories), ...]`` in manifest order; ``columns`` maps a key to
    the obs column holding it (default: the same name). Values are compared as strings; new
    categories are appended sorted, so the same query always gets the same codes.
    """
    columns = dict(columns or {})
    keys, used_columns, categories, codes = [], [], [], []
    new_categories: dict[str, tuple[str, ...]] = {}
    for key, known in reference:
        known = tuple(_category_name(c) for c in known)
        if len(set(known)) != len(known):
            raise CovariateError(
                f"the reference lists a category of {key!r} more than once",
                key=key,
                hint="The manifest is corrupted; pull the reference again or re-create it",
            )
        column = columns.get(key, key)
        role = f"the reference's covariate {key!r}"
        cell_codes, names = string_codes(obs_column(obs, column, key=key, role=role))
        require_values(cell_codes, column=column, key=key, role=role)
        added = tuple(sorted(set(names) - set(known)))
        full = known + added
        lookup = {name: i for i, name in enumerate(full)}
        keys.append(key)
        used_columns.append(column)
        categories.append(full)
        if added:
            new_categories[key] = added
        codes.append(np.array([lookup[n] for n in names], dtype=np.int64)[cell_codes])
    stacked = np.stack(codes, axis=1) if codes else np.zeros((len(obs), 0), dtype=np.int64)
    return CovariateEncoding(
        keys=tuple(keys),
        columns=tuple(used_columns),
        categories=tuple(categories),
        new_categories=new_categories,
        codes=stacked,
    )
