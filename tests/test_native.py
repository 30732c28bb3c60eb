"""The C helpers in hubarches.native: minibatch densification (the core is in test_fastlik)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from hubarches import native
from hubarches.batching import CountMatrix

pytestmark = pytest.mark.skipif(native._fastcore is None, reason="hubarches._fastcore not built")


def _matrix(index_dtype: type) -> sp.csr_matrix:
    rng = np.random.default_rng(0)
    dense = (rng.poisson(0.6, (40, 33)) * rng.integers(1, 9, (40, 33))).astype(np.float32)
    dense[[3, 17]] = 0.0  # empty rows
    csr = sp.csr_matrix(dense)
    csr.indices = csr.indices.astype(index_dtype)
    csr.indptr = csr.indptr.astype(index_dtype)
    return csr


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_dense_rows_equal_scipys(index_dtype: type) -> None:
    csr = _matrix(index_dtype)
    rows = np.array([5, 3, 39, 0, 5, 17, 22])  # unsorted, repeated, empty, both ends
    out = native.dense_rows(csr, rows)
    assert out is not None
    assert out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), csr[rows].toarray())
    assert native.dense_rows(csr, np.array([], dtype=np.int64)).shape == (0, 33)


def test_dense_rows_refuse_rows_and_columns_outside_the_matrix() -> None:
    csr = _matrix(np.int32)
    with pytest.raises(IndexError):
        native.dense_rows(csr, np.array([40]))
    with pytest.raises(IndexError):
        native.dense_rows(csr, np.array([-1]))
    bad = csr.copy()
    bad.indices[bad.indptr[1]] = 33  # a corrupt column index is refused, never written
    with pytest.raises(ValueError, match="outside the matrix"):
        native.dense_rows(bad, np.array([1]))


def test_dense_rows_decline_what_they_cannot_read(monkeypatch: pytest.MonkeyPatch) -> None:
    csr = _matrix(np.int32)
    assert native.dense_rows(csr.astype(np.float64), np.array([0])) is None
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    assert native.dense_rows(csr, np.array([0])) is None


def test_minibatches_are_the_same_with_and_without_the_c_code(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counts = CountMatrix.from_matrix(_matrix(np.int32))
    rows = np.array([7, 2, 30, 3])
    fast = counts.minibatch(rows)
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    plain = counts.minibatch(rows)
    assert torch.equal(fast.x, plain.x)
    for a, b in zip(fast.nonzero, plain.nonzero, strict=True):
        assert torch.equal(a, b)
