"""hubarches.gemm: products with a frozen matrix, on the AVX-512 or AVX2 kernels where they run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from hubarches import gemm

kernels = pytest.mark.skipif(
    not gemm.kernels_supported(), reason="the kernels need AVX-512F or AVX2 and _fastgemm"
)

# Rows, columns and depth around the kernels' 12 x 32 tiles and 256-long reduction chunks.
SHAPES = [(128, 4000, 128), (1, 1, 1), (13, 33, 7), (12, 32, 32), (25, 257, 100), (7, 600, 33)]


def _data(m: int, n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g) for shape in ((n, k), (m, k), (m, n)))


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Within float32 rounding of a float64 product (relative to the largest entry)."""
    scale = max(float(want.abs().max()), 1.0)
    assert float((got.double() - want).abs().max()) <= 1e-5 * scale


@pytest.mark.parametrize("use_kernels", [False, pytest.param(True, marks=kernels)])
@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_products_equal_float64_ones(use_kernels: bool, m: int, n: int, k: int) -> None:
    w, h, g = _data(m, n, k)
    product = gemm.FrozenProduct(w, use_kernels=use_kernels)
    assert product.uses_kernels is use_kernels
    _close(product.forward(h, torch.full((m, n), float("nan"))), h.double() @ w.double().t())
    _close(product.backward(g, torch.full((m, k), float("nan"))), g.double() @ w.double())


@pytest.mark.parametrize("use_kernels", [False, pytest.param(True, marks=kernels)])
def test_bound_products_equal_the_calls_and_read_the_buffers_when_run(use_kernels: bool) -> None:
    """The query step binds its buffers once; each run reads what they hold then."""
    w, h, g = _data(25, 257, 100)
    product = gemm.FrozenProduct(w, use_kernels=use_kernels)
    out_f, out_b = torch.empty(25, 257), torch.empty(25, 100)
    forward, backward = product.bind_forward(h, out_f), product.bind_backward(g, out_b)
    for _ in range(2):
        assert forward() is out_f
        assert backward() is out_b
        assert torch.equal(out_f, product.forward(h, torch.empty(25, 257)))
        assert torch.equal(out_b, product.backward(g, torch.empty(25, 100)))
        _close(out_f, h.double() @ w.double().t())
        h.mul_(-2.0)  # new contents, same buffers
        g.add_(1.0)


@kernels
def test_row_views_with_a_longer_stride_are_read_and_written_in_place() -> None:
    """The query step's buffers are column slices of a wider array."""
    w, h, g = _data(20, 70, 40)
    wide_h = torch.randn(20, 50)
    wide_h[:, :40] = h
    out = torch.zeros(20, 100)
    product = gemm.FrozenProduct(w, use_kernels=True)
    product.forward(wide_h[:, :40], out[:, 10:80])
    _close(out[:, 10:80], h.double() @ w.double().t())
    assert bool((out[:, :10] == 0).all())
    assert bool((out[:, 80:] == 0).all())
    grad = torch.zeros(20, 60)
    product.backward(torch.cat([g, torch.ones(20, 5)], dim=1)[:, :70], grad[:, 5:45])
    _close(grad[:, 5:45], g.double() @ w.double())
    assert bool((grad[:, :5] == 0).all())
    assert bool((grad[:, 45:] == 0).all())


@kernels
def test_results_do_not_depend_on_the_thread_count() -> None:
    """Each output is one thread's sum in a fixed order: a run repeats bitwise."""
    w, h, g = _data(128, 1000, 128, seed=3)
    product = gemm.FrozenProduct(w, use_kernels=True)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(
                (
                    product.forward(h, torch.empty(128, 1000)),
                    product.backward(g, torch.empty(128, 128)),
                )
            )
    finally:
        torch.set_num_threads(before)
    for fwd, bwd in results[1:]:
        assert torch.equal(fwd, results[0][0])
        assert torch.equal(bwd, results[0][1])


@pytest.fixture
def isa_cap() -> Iterator[None]:
    """Restores the kernels' instruction set after a test lowers it with set_isa()."""
    yield
    assert gemm._fastgemm is not None
    gemm._fastgemm.set_isa("avx512")


@pytest.mark.skipif(
    gemm.kernels_isa() != "avx512", reason="comparing the two needs an AVX-512 processor"
)
@pytest.mark.parametrize(("m", "n", "k"), [(128, 4000, 128), (13, 33, 7), (25, 257, 300)])
def test_avx2_kernels_give_the_avx512_kernels_results_bitwise(
    isa_cap: None, monkeypatch: pytest.MonkeyPatch, m: int, n: int, k: int
) -> None:
    """The same sums in the same order on either instruction set, so a run repeats anywhere."""
    assert gemm._fastgemm is not None
    monkeypatch.setenv(gemm.GEMM_ENV, "kernels")  # the changing-matrix products too
    w, h, g = _data(m, n, k, seed=5)
    runs = []
    for isa in ("avx512", "avx2"):
        assert gemm._fastgemm.set_isa(isa) == isa
        product = gemm.FrozenProduct(w, use_kernels=True)  # packed for this instruction set
        runs.append(
            (
                product.forward(h, torch.empty(m, n)),
                product.backward(g, torch.empty(m, k)),
                gemm.transposed_times(g, h, torch.empty(n, k)),  # packed on each call
            )
        )
    for avx512, avx2 in zip(*runs, strict=True):
        assert torch.equal(avx512, avx2)


@kernels
def test_without_an_instruction_set_the_kernels_are_off(isa_cap: None) -> None:
    assert gemm._fastgemm is not None
    assert gemm._fastgemm.set_isa("") == ""
    assert not gemm.kernels_supported()
    assert not gemm.FrozenProduct(torch.randn(8, 4), use_kernels=True).uses_kernels
    with pytest.raises(ValueError, match="avx512"):
        gemm._fastgemm.set_isa("sse9")


@pytest.mark.parametrize(("m", "n", "k"), [(0, 5, 4), (3, 0, 4), (3, 5, 0)])
def test_empty_products(m: int, n: int, k: int) -> None:
    w, h, g = _data(m, n, k)
    product = gemm.FrozenProduct(w)
    assert product.forward(h, torch.empty(m, n)).shape == (m, n)
    assert torch.equal(product.backward(g, torch.ones(m, k)), torch.zeros(m, k))


def test_the_environment_switch_turns_the_kernels_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(gemm.GEMM_ENV, "torch")
    assert not gemm.kernels_available()
    assert not gemm.FrozenProduct(torch.randn(8, 4)).uses_kernels
    assert not gemm.FrozenProduct(torch.randn(8, 4), use_kernels=True).uses_kernels


@kernels
def test_the_default_follows_the_vendor_and_the_switch_forces_the_kernels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Auto: frozen matrices on the kernels; changing ones only on AVX-512, off Intel's."""
    assert gemm._fastgemm is not None
    monkeypatch.delenv(gemm.GEMM_ENV, raising=False)
    avx512 = gemm.kernels_isa() == "avx512"
    assert gemm.kernels_isa() in ("avx512", "avx2")
    assert gemm.kernels_available(frozen=True)
    assert gemm.FrozenProduct(torch.randn(8, 4)).uses_kernels
    assert gemm.kernels_available() is (avx512 and not bool(gemm._fastgemm.intel()))
    monkeypatch.setenv(gemm.GEMM_ENV, "kernels")
    assert gemm.kernels_available()
    assert gemm.kernels_available(frozen=True)
    assert gemm.FrozenProduct(torch.randn(8, 4)).uses_kernels


@kernels
def test_changing_products_follow_the_vendor_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """times() packs and runs the kernels exactly where kernels_available() says so."""
    assert gemm._fastgemm is not None
    calls: list[int] = []
    real_pack = gemm._fastgemm.pack

    class Counting:
        """_fastgemm with pack() counted."""

        def __getattr__(self, name: str) -> object:
            return getattr(real_pack.__self__, name) if name != "pack" else self.pack

        @staticmethod
        def pack(*args: object) -> None:
            calls.append(1)
            real_pack(*args)

    monkeypatch.setattr(gemm, "_fastgemm", Counting())
    g, w = torch.randn(6, 40), torch.randn(40, 16)
    auto = gemm.kernels_isa() == "avx512" and not real_pack.__self__.intel()
    for setting, expected in (("auto", auto), ("kernels", True)):
        monkeypatch.setenv(gemm.GEMM_ENV, setting)
        calls.clear()
        out = gemm.times(g, w, torch.empty(6, 16))
        torch.testing.assert_close(out, g @ w, rtol=1e-5, atol=1e-4)
        assert bool(calls) is expected, setting


def test_other_dtypes_fall_back_to_torch() -> None:
    w = torch.randn(40, 16, dtype=torch.float64)
    product = gemm.FrozenProduct(w, use_kernels=True)
    assert not product.uses_kernels
    h = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(
        product.forward(h, torch.empty(3, 40, dtype=torch.float64)), h @ w.t()
    )


@kernels
def test_inputs_of_other_layouts_go_to_torch() -> None:
    w, h, _ = _data(5, 40, 16)
    product = gemm.FrozenProduct(w, use_kernels=True)
    # A transposed (column-major) input is not the kernels' layout: torch.mm computes it.
    _close(product.forward(h.t().contiguous().t(), torch.empty(5, 40)), h.double() @ w.double().t())


def test_a_non_matrix_is_refused() -> None:
    with pytest.raises(ValueError, match="matrix"):
        gemm.FrozenProduct(torch.randn(3))


@pytest.mark.parametrize("use_kernels", ["auto", "torch"])
def test_products_with_a_changing_matrix_see_every_change(
    use_kernels: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """times / times_transposed pack their matrix anew each call (training's heads)."""
    monkeypatch.setenv(gemm.GEMM_ENV, use_kernels)
    w, h, g = _data(37, 300, 50, seed=5)
    for _ in range(2):
        _close(gemm.times_transposed(h, w, torch.empty(37, 300)), h.double() @ w.double().t())
        _close(gemm.times(g, w, torch.empty(37, 50)), g.double() @ w.double())
        w.mul_(-1.5)  # an optimizer step between calls
    small = torch.randn(3, 50)  # a smaller matrix after a larger one reuses the buffer
    _close(
        gemm.times(torch.ones(2, 3), small, torch.empty(2, 50)),
        torch.ones(2, 3).double() @ small.double(),
    )


@pytest.mark.parametrize("use_kernels", [pytest.param("kernels", marks=kernels), "torch"])
@pytest.mark.parametrize(("split", "n", "k"), [(2000, 4000, 128), (13, 33, 7), (5, 37, 50)])
def test_a_stacked_pair_is_read_as_the_one_matrix_of_its_rows(
    use_kernels: str, split: int, n: int, k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """times / times_transposed of (top, bottom) give those of torch.cat, bitwise.

    The splits fall inside the kernels' 16- and 32-row panels, and at none of their edges.
    """
    monkeypatch.setenv(gemm.GEMM_ENV, use_kernels)
    w, h, g = _data(19, n, k, seed=9)
    pair = (w[:split].clone(), w[split:].clone())  # two allocations, as two heads' weights
    assert pair[0].data_ptr() + pair[0].numel() * 4 != pair[1].data_ptr()
    forward = gemm.times_transposed(h, pair, torch.full((19, n), float("nan")))
    assert torch.equal(forward, gemm.times_transposed(h, w, torch.empty(19, n)))
    back = gemm.times(g, pair, torch.full((19, k), float("nan")))
    assert torch.equal(back, gemm.times(g, w, torch.empty(19, k)))
    _close(forward, h.double() @ w.double().t())
    _close(back, g.double() @ w.double())


@pytest.mark.skipif(gemm._fastgemm is None, reason="_fastgemm is not built")
def test_pack_refuses_a_split_without_its_second_matrix() -> None:
    assert gemm._fastgemm is not None
    w = torch.zeros(8, 4)
    out = torch.empty(gemm._fastgemm.packed_size(8, 4))
    for extra in ((0, 3), (w.data_ptr(), 9), (w.data_ptr(), -2)):
        with pytest.raises(ValueError, match="inconsistent"):
            gemm._fastgemm.pack(w.data_ptr(), 8, 4, 4, out.data_ptr(), True, 1, *extra)


def _expected_rows_pack(w: torch.Tensor, panel: int) -> torch.Tensor:
    """pack(transposed=True)'s layout built by hand: panels of ``panel`` rows, each transposed."""
    n, k = w.shape
    padded = torch.zeros((n + panel - 1) // panel * panel, k)
    padded[:n] = w
    return padded.reshape(-1, panel, k).transpose(1, 2).reshape(-1)


AVX512_ONLY = pytest.mark.skipif(
    gemm.kernels_isa() != "avx512", reason="32-column panels need an AVX-512 processor"
)


@kernels
@pytest.mark.parametrize("isa", [pytest.param("avx512", marks=AVX512_ONLY), "avx2"])
@pytest.mark.parametrize(("n", "k", "split"), [(70, 24, 37), (64, 128, 64), (33, 20, 5), (8, 8, 8)])
def test_a_transposing_pack_lays_out_every_panel(
    isa_cap: None, isa: str, n: int, k: int, split: int
) -> None:
    """Full panels (in 8 x 8 blocks where k allows) and the zero-padded last one, of a pair."""
    assert gemm._fastgemm is not None
    assert gemm._fastgemm.set_isa(isa) == isa
    panel = 32 if isa == "avx512" else 16
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k))
    top, bottom = w[:split].clone(), w[split:].clone()
    out = torch.full((gemm._fastgemm.packed_size(n, k),), float("nan"))
    second = (bottom.data_ptr(), split) if split < n else ()
    gemm._fastgemm.pack(top.data_ptr(), n, k, k, out.data_ptr(), True, 2, *second)
    expected = _expected_rows_pack(w, panel)
    assert torch.equal(out[: expected.numel()], expected)


@pytest.mark.parametrize("use_kernels", ["auto", "torch"])
@pytest.mark.parametrize(("m", "n", "k"), [(128, 4000, 128), (13, 37, 45), (1, 1, 1), (0, 5, 3)])
def test_weight_gradient_products_equal_float64_ones(
    use_kernels: str, m: int, n: int, k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(gemm.GEMM_ENV, use_kernels)
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(m, n, generator=g), torch.randn(m, k, generator=g)
    got = gemm.transposed_times(a, b, torch.full((n, k), float("nan")))
    _close(got, a.double().t() @ b.double())
    wide = torch.zeros(m, n + 9)  # a column block of a wider matrix, as the heads' gradients
    wide[:, 4 : 4 + n] = a
    _close(
        gemm.transposed_times(wide[:, 4 : 4 + n], b, torch.empty(n, k)), a.double().t() @ b.double()
    )
