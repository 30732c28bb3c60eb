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


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_dense_rows_of_unsorted_and_duplicated_columns_equal_scipys(index_dtype: type) -> None:
    """Rows outside scipy's canonical format take the general pass; duplicates add up."""
    indptr = np.array([0, 3, 6, 8], dtype=index_dtype)
    indices = np.array([4, 1, 2, 0, 3, 3, 2, 5], dtype=index_dtype)  # unsorted; 3 twice
    data = np.arange(1, 9, dtype=np.float32)
    csr = sp.csr_matrix((data, indices, indptr), shape=(3, 6))
    csr.indices, csr.indptr = indices, indptr  # the index width under test
    assert not csr.has_canonical_format
    rows = np.array([0, 1, 2, 1])
    out = native.dense_rows(csr, rows)
    assert out is not None
    expected = np.zeros((3, 6), dtype=np.float32)
    for r in range(3):
        for k in range(indptr[r], indptr[r + 1]):
            expected[r, indices[k]] += data[k]
    np.testing.assert_array_equal(out.numpy(), expected[rows])
    assert out[1, 3] == 11.0  # 5 + 6


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
    torch.testing.assert_close(fast.x_log, plain.x_log, rtol=1e-6, atol=0.0)
    for a, b in zip(fast.nonzero, plain.nonzero, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_a_minibatchs_log1p_is_taken_on_its_stored_counts(index_dtype: type) -> None:
    """The encoder's input, made in C from the CSR rows without the dense counts."""
    csr = _matrix(index_dtype)
    rows = np.array([5, 3, 39, 0, 5, 17])
    logged = native.dense_rows(csr, rows, log1p=True)
    assert logged is not None
    np.testing.assert_allclose(logged.numpy(), np.log1p(csr[rows].toarray()), rtol=1e-6)
    batch = CountMatrix.from_matrix(csr).minibatch(rows)
    assert batch.x_log is batch.x_log  # made once
    assert torch.equal(batch.x_log, logged)
    assert torch.equal(batch.to(torch.device("cpu"), torch.float64).x_log, logged.double())


def test_a_minibatch_checks_its_rows_at_once_and_densifies_when_read() -> None:
    counts = CountMatrix.from_matrix(_matrix(np.int32))
    with pytest.raises(IndexError):
        counts.minibatch(np.array([0, 40]))
    batch = counts.minibatch(np.array([9, 1]))
    assert batch.stored is not None
    np.testing.assert_array_equal(batch.stored.rows, [9, 1])
    np.testing.assert_array_equal(batch.x.numpy(), counts.csr[[9, 1]].toarray())
    assert batch.x is batch.x  # made once


# --- the likelihood core reading CSR rows ----------------------------------------------------


def _core_inputs(csr: sp.csr_matrix, rows: np.ndarray) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(len(rows), csr.shape[1], generator=gen)
    p = torch.randn(len(rows), csr.shape[1], generator=gen)
    x = torch.from_numpy(csr[rows].toarray())
    log_lib = torch.log(x.sum(1).clamp(min=1.0))
    log_theta = torch.randn(csr.shape[1], generator=gen)
    return a, p, x, log_lib, log_theta.exp(), log_theta


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_core_reads_counts_from_csr_rows(index_dtype: type) -> None:
    csr = _matrix(index_dtype)
    rows = np.array([5, 3, 39, 0, 5, 17])
    a, p, x, log_lib, theta, log_theta = _core_inputs(csr, rows)
    dense = native.native_core(a, p, x, log_lib, theta, log_theta, zinb=True, want_theta=True)
    read = native.native_core(
        a, p, None, log_lib, theta, log_theta, zinb=True, want_theta=True, csr=csr, rows=rows
    )
    for d, r in zip(dense, read, strict=True):
        assert d is not None
        assert r is not None
        torch.testing.assert_close(r, d, rtol=0, atol=0)


def test_core_refuses_csr_rows_it_cannot_trust() -> None:
    csr = _matrix(np.int32)
    rows = np.array([1, 2])
    a, p, _, log_lib, theta, log_theta = _core_inputs(csr, rows)
    kwargs = {"zinb": True, "want_theta": False}
    with pytest.raises(ValueError, match="CSR rows"):
        native.native_core(a, p, None, log_lib, theta, log_theta, **kwargs)  # no source
    with pytest.raises(ValueError, match="3 CSR rows for 2 cells"):
        native.native_core(
            a, p, None, log_lib, theta, log_theta, csr=csr, rows=np.array([1, 2, 3]), **kwargs
        )
    with pytest.raises(IndexError):
        native.native_core(
            a, p, None, log_lib, theta, log_theta, csr=csr, rows=np.array([1, 40]), **kwargs
        )
    bad = csr.copy()
    bad.indices[bad.indptr[2]] = 33
    with pytest.raises(ValueError, match="outside the matrix"):
        native.native_core(a, p, None, log_lib, theta, log_theta, csr=bad, rows=rows, **kwargs)


def _prepared(a: torch.Tensor, p: torch.Tensor, theta, log_theta) -> tuple:
    """A PreparedCore on buffers laid out as query training lays them (both heads side by side)."""
    n, g = a.shape
    heads, grads = torch.empty(n, 2 * g), torch.empty(n, 2 * g)
    heads[:, :g], heads[:, g:] = a, p
    bias_a, bias_p = torch.linspace(-1, 1, g), torch.linspace(1, -1, g)
    nll = torch.empty(n)
    core = native.PreparedCore(
        heads[:, :g], heads[:, g:], theta, log_theta, zinb=True, bias_a=bias_a, bias_p=bias_p,
        out=(nll, grads[:, :g], grads[:, g:]),
    )  # fmt: skip
    return core, grads, bias_a, bias_p


def test_a_prepared_core_equals_native_core_call_after_call() -> None:
    """Same buffers, new rows and library sizes each call: the same numbers as native_core."""
    csr = _matrix(np.int32)
    a, p, _, _, theta, log_theta = _core_inputs(csr, np.arange(6))
    core, grads, bias_a, bias_p = _prepared(a, p, theta, log_theta)
    g = csr.shape[1]
    for rows in (np.array([5, 3, 39, 0, 5, 17]), np.array([1, 2, 3, 4, 6, 7])):
        log_lib = torch.log(torch.from_numpy(csr[rows].toarray()).sum(1).clamp(min=1.0))
        nll = core(csr, rows, log_lib.numpy())
        want = native.native_core(
            a, p, None, log_lib, theta, log_theta, zinb=True, want_theta=False,
            bias_a=bias_a, bias_p=bias_p, csr=csr, rows=rows,
        )  # fmt: skip
        torch.testing.assert_close(nll, want[0], rtol=0, atol=0)
        torch.testing.assert_close(grads[:, :g], want[1], rtol=0, atol=0)
        torch.testing.assert_close(grads[:, g:], want[2], rtol=0, atol=0)


def test_a_prepared_core_refuses_what_changed_shape() -> None:
    csr = _matrix(np.int32)
    a, p, _, log_lib, theta, log_theta = _core_inputs(csr, np.arange(4))
    core, *_ = _prepared(a, p, theta, log_theta)
    lib = log_lib.numpy()
    with pytest.raises(ValueError, match="5 CSR rows for 4 cells"):
        core(csr, np.arange(5), np.zeros(5, np.float32))
    with pytest.raises(IndexError):
        core(csr, np.array([0, 1, 2, 40]), lib)
    with pytest.raises(ValueError, match="log_library"):
        core(csr, np.arange(4), lib.astype(np.float64))
    with pytest.raises(ValueError, match="one column per gene"):
        core(csr[:, :-1], np.arange(4), lib)
    with pytest.raises(ValueError, match="bias"):
        native.PreparedCore(
            a, p, theta, log_theta, zinb=True, bias_a=torch.zeros(3), bias_p=None,
            out=(torch.empty(4), torch.empty_like(a), torch.empty_like(p)),
        )  # fmt: skip
    with pytest.raises(ValueError, match="dropout logits"):
        native.PreparedCore(
            a, None, theta, log_theta, zinb=True, bias_a=None, bias_p=None,
            out=(torch.empty(4), torch.empty_like(a), torch.empty_like(p)),
        )  # fmt: skip


def test_a_prepared_core_checks_each_new_matrix_once() -> None:
    """The verdict on a matrix is kept; other arrays or shapes are checked anew."""
    csr = _matrix(np.int32)
    a, p, _, log_lib, theta, log_theta = _core_inputs(csr, np.arange(4))
    core, *_ = _prepared(a, p, theta, log_theta)
    assert core.reads(csr)
    assert core.reads(csr)  # kept
    wide = csr.astype(np.float64)
    assert not core.reads(wide)
    with pytest.raises(ValueError, match="CSR rows it can read"):
        core(wide, np.arange(4), log_lib.numpy())
    swapped = csr.copy()
    swapped.data = swapped.data.astype(np.float64)  # same object, other arrays
    assert core.reads(csr)
    assert not core.reads(swapped)
    nll = core(csr, np.arange(4), log_lib.numpy())
    assert torch.isfinite(nll).all()


# --- the log-gamma terms on CSR rows ------------------------------------------------------


def _lgamma_matrix(index_dtype: type) -> sp.csr_matrix:
    """Counts on and off the C table: small, above it (up to 5,000) and non-integer."""
    csr = _matrix(index_dtype)
    csr.data[::7] = 40.0
    csr.data[3::11] = 5_000.0
    csr.data[5::13] = 2.5
    return csr


def _plain_log_gamma(csr: sp.csr_matrix, rows: np.ndarray, theta: torch.Tensor) -> torch.Tensor:
    """Σ log Γ(x+θ) − log Γ(θ) per row, in float64 through torch.lgamma."""
    sub = csr[rows].tocoo()
    th = theta[torch.from_numpy(sub.col.astype(np.int64))]
    values = torch.from_numpy(sub.data.astype(np.float64))
    terms = torch.lgamma(values + th) - torch.lgamma(th)
    return torch.zeros(len(rows), dtype=torch.float64).index_add(
        0, torch.from_numpy(sub.row.astype(np.int64)), terms
    )


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_theta_log_gamma_and_its_gradient_equal_lgamma(index_dtype: type) -> None:
    csr = _lgamma_matrix(index_dtype)
    assert (csr.data > 32).any()
    assert (csr.data != np.round(csr.data)).any()
    gen = torch.Generator().manual_seed(0)
    theta = torch.exp(torch.randn(33, generator=gen, dtype=torch.float64) * 2)
    rows = np.array([5, 3, 39, 0, 5, 17, 22])  # unsorted, repeated, empty rows
    th = theta.clone().requires_grad_()
    plain = _plain_log_gamma(csr, rows, th)
    fast = native.theta_log_gamma(csr, rows, theta.float())
    torch.testing.assert_close(fast.double(), plain.detach(), rtol=1e-6, atol=1e-3)
    weights = torch.randn(len(rows), generator=gen)
    (expected,) = torch.autograd.grad((plain * weights.double()).sum(), th)
    got = native.theta_log_gamma_grad(csr, rows, theta.float(), weights)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
    every = native.theta_log_gamma(csr, None, theta.float())  # rows None: all, in order
    torch.testing.assert_close(
        every.double(), _plain_log_gamma(csr, np.arange(40), theta), rtol=1e-6, atol=1e-3
    )
    both, grad = native.theta_log_gamma_with_grad(csr, rows, theta.float(), weights)
    assert both is not None
    assert torch.equal(both, fast)  # the one pass gives what the two separate ones give
    assert torch.equal(grad, got)


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_theta_log_gamma_of_unsorted_and_repeated_columns_is_per_stored_count(
    index_dtype: type,
) -> None:
    """Rows whose columns do not strictly increase take the one-by-one gradient pass."""
    indptr = np.array([0, 4, 7, 7, 9], dtype=index_dtype)
    indices = np.array([4, 1, 2, 1, 0, 3, 3, 5, 2], dtype=index_dtype)  # unsorted; repeats
    data = np.array([3, 1, 40, 2, 7, 2.5, 5_000, 1, 4], dtype=np.float32)
    csr = sp.csr_matrix((data, indices, indptr), shape=(4, 6))
    csr.indices, csr.indptr = indices, indptr  # as given: scipy would not sum them here
    assert not csr.has_canonical_format
    theta = torch.tensor([0.3, 2.0, 11.0, 0.05, 1.5, 7.0], dtype=torch.float64)
    rows = np.array([0, 1, 2, 3, 0])
    th = theta.clone().requires_grad_()
    plain = torch.stack(
        [
            sum(
                (
                    torch.lgamma(float(data[k]) + th[int(indices[k])])
                    - torch.lgamma(th[int(indices[k])])
                    for k in range(int(indptr[r]), int(indptr[r + 1]))
                ),
                torch.zeros((), dtype=torch.float64),
            )
            for r in rows
        ]
    )
    fast = native.theta_log_gamma(csr, rows, theta.float())
    torch.testing.assert_close(fast.double(), plain.detach(), rtol=1e-6, atol=1e-3)
    weights = torch.tensor([0.5, -1.0, 2.0, 1.5, 0.25])
    (expected,) = torch.autograd.grad((plain * weights.double()).sum(), th)
    got = native.theta_log_gamma_grad(csr, rows, theta.float(), weights)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


def test_theta_log_gamma_refuses_columns_outside_the_matrix() -> None:
    bad = _matrix(np.int32)
    bad.indices[bad.indptr[1]] = 33
    theta = torch.ones(33)
    with pytest.raises(ValueError, match="outside the matrix"):
        native.theta_log_gamma(bad, np.array([1]), theta)
    with pytest.raises(ValueError, match="outside the matrix"):
        native.theta_log_gamma_grad(bad, np.array([0, 1]), theta, torch.ones(2))
    with pytest.raises(ValueError, match="outside the matrix"):
        native.theta_log_gamma_with_grad(bad, np.array([0, 1]), theta, torch.ones(2))
    with pytest.raises(ValueError, match="θ must be"):
        native.theta_log_gamma(_matrix(np.int32), np.array([1]), torch.ones(32))


def _by_category_expected(
    csr: sp.csr_matrix,
    rows: np.ndarray,
    categories: np.ndarray,
    table: torch.Tensor,
    weights: torch.Tensor,
    grad_lt: torch.Tensor,
    scale: float,
) -> tuple[float, torch.Tensor]:
    """The grouped call's total and gradient in log θ, per row through torch.lgamma."""
    th = table.double().clone().requires_grad_()
    values = torch.cat(
        [_plain_log_gamma(csr, rows[i : i + 1], th[int(c)]) for i, c in enumerate(categories)]
    )
    (grad_theta,) = torch.autograd.grad((values * weights.double()).sum(), th)
    core = torch.zeros_like(th).index_add(0, torch.from_numpy(categories), grad_lt.double())
    return float(values.sum()), scale * core - th.detach() * grad_theta


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("n_categories", [3, 25], ids=["one table group", "two table groups"])
def test_theta_log_gamma_by_category_equals_lgamma_row_by_row(
    index_dtype: type, n_categories: int
) -> None:
    """θ per category in one call: totals and log θ gradients, absent categories zero."""
    csr = _lgamma_matrix(index_dtype)
    rng = np.random.default_rng(1)
    gen = torch.Generator().manual_seed(1)
    rows = rng.integers(0, 40, 60)  # unsorted, repeated, the empty rows among them
    rows[:2] = [3, 17]
    # every category but the last two, so that 23 of 25 (two groups of tables) are present
    categories = np.arange(60) % max(1, n_categories - 2)
    rng.shuffle(categories)
    table = torch.exp(torch.randn(n_categories, 33, generator=gen) * 2)
    weights = torch.rand(60, generator=gen)
    grad_lt = torch.randn(60, 33, generator=gen)
    out = torch.full((n_categories, 33), float("nan"))
    total = native.theta_log_gamma_by_category(
        csr, rows, categories, table, weights, out, grad_lt=grad_lt, scale=0.25
    )
    expected_total, expected = _by_category_expected(
        csr, rows, categories, table, weights, grad_lt, 0.25
    )
    assert total == pytest.approx(expected_total, rel=1e-6)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)
    absent = sorted(set(range(n_categories)) - set(categories.tolist()))
    assert absent
    assert torch.equal(out[absent], torch.zeros(len(absent), 33))
    # without the core's part: the log-gamma terms' gradient alone
    alone = torch.empty_like(out)
    again = native.theta_log_gamma_by_category(csr, rows, categories, table, weights, alone)
    assert again == total
    _, expected_alone = _by_category_expected(
        csr, rows, categories, table, weights, torch.zeros_like(grad_lt), 0.0
    )
    torch.testing.assert_close(alone.double(), expected_alone, rtol=1e-5, atol=1e-4)


def test_theta_log_gamma_by_category_of_one_category_is_the_per_gene_pass() -> None:
    csr = _lgamma_matrix(np.int32)
    rows = np.array([5, 3, 39, 0, 5, 17, 22])
    theta = torch.exp(torch.randn(33, generator=torch.Generator().manual_seed(2)))
    weights = torch.full((7,), 1.0 / 7)
    values, grad = native.theta_log_gamma_with_grad(csr, rows, theta, weights)
    assert values is not None
    out = torch.empty(1, 33)
    total = native.theta_log_gamma_by_category(
        csr, rows, np.zeros(7, dtype=np.int64), theta[None].clone(), weights, out
    )
    assert total == pytest.approx(float(values.double().sum()), rel=1e-7)
    torch.testing.assert_close(out[0], -grad * theta, rtol=1e-6, atol=1e-7)
    every = torch.empty(1, 33)  # rows None: every row, in order
    all_rows = np.arange(40)
    total = native.theta_log_gamma_by_category(
        csr, None, np.zeros(40, dtype=np.int64), theta[None].clone(), torch.ones(40), every
    )
    assert total == pytest.approx(float(_plain_log_gamma(csr, all_rows, theta.double()).sum()),
                                  rel=1e-6)  # fmt: skip


def test_theta_log_gamma_by_category_refuses_bad_input_before_writing() -> None:
    csr = _matrix(np.int32)
    table, weights, rows = torch.ones(3, 33), torch.ones(2), np.array([0, 1])
    out = torch.full((3, 33), 7.0)
    for codes in ([0, 3], [-1, 0]):
        with pytest.raises(IndexError, match="category codes outside"):
            native.theta_log_gamma_by_category(csr, rows, np.array(codes), table, weights, out)
        assert torch.equal(out, torch.full((3, 33), 7.0))
    with pytest.raises(IndexError, match="row numbers outside"):
        native.theta_log_gamma_by_category(csr, np.array([0, 40]), np.zeros(2), table, weights, out)
    with pytest.raises(ValueError, match="one category per row"):
        native.theta_log_gamma_by_category(csr, rows, np.zeros(3), table, weights, out)
    with pytest.raises(ValueError, match="θ must be"):
        native.theta_log_gamma_by_category(csr, rows, np.zeros(2), torch.ones(3, 32), weights, out)
    with pytest.raises(ValueError, match="out must be"):
        native.theta_log_gamma_by_category(csr, rows, np.zeros(2), table, weights, out[:2])
    with pytest.raises(ValueError, match="weights must be"):
        native.theta_log_gamma_by_category(csr, rows, np.zeros(2), table, torch.ones(3), out)
    with pytest.raises(ValueError, match="grad_lt must be"):
        native.theta_log_gamma_by_category(
            csr, rows, np.zeros(2), table, weights, out, grad_lt=torch.ones(2, 32)
        )
    bad = _matrix(np.int32)
    bad.indices[bad.indptr[1]] = 33
    with pytest.raises(ValueError, match="outside the matrix"):
        native.theta_log_gamma_by_category(bad, rows, np.zeros(2), table, weights, out)


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_dense_log1p_equals_scipys(index_dtype: type) -> None:
    csr = _lgamma_matrix(index_dtype)
    out = torch.full((40, 33), 7.0)  # stale contents are overwritten
    assert native.dense_log1p(csr, out)
    np.testing.assert_allclose(out.numpy(), np.log1p(csr.toarray()), rtol=1e-6, atol=0)
    counts = CountMatrix.from_matrix(csr)
    buffer = np.full((50, 33), 3.0, dtype=np.float32)
    np.testing.assert_allclose(counts.dense_log1p(buffer).numpy(), out.numpy(), rtol=0, atol=0)


def test_theta_log_gamma_takes_rows_with_many_large_counts() -> None:
    """A row with more off-table counts than the C pass remembers takes a second scan."""
    rng = np.random.default_rng(1)
    dense = rng.integers(33, 400, (3, 700)).astype(np.float32)  # every count off the table
    dense[1, ::2] = 3.0
    csr = sp.csr_matrix(dense)
    theta = torch.from_numpy(rng.uniform(0.1, 20, 700))
    rows = np.array([0, 1, 2])
    th = theta.clone().requires_grad_()
    plain = _plain_log_gamma(csr, rows, th)
    fast = native.theta_log_gamma(csr, rows, theta.float())
    torch.testing.assert_close(fast.double(), plain.detach(), rtol=1e-6, atol=1e-2)
    (expected,) = torch.autograd.grad(plain.sum(), th)
    got = native.theta_log_gamma_grad(csr, rows, theta.float(), torch.ones(3))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)
