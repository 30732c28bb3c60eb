"""Products with a frozen matrix, on hubarches' own kernels where they beat MKL's.

Query training multiplies by the decoder's frozen gene-wide heads ``W [n, k]`` twice a step:
``H Wᵀ`` forward and ``G W`` back to the hidden layer. PyTorch's CPU wheel hands both to MKL,
which on AMD processors with AVX-512 (Zen 4, Zen 5) runs its AVX2 code, about half of what
the cores can do; ``hubarches._fastgemm`` packs ``W`` once and runs register-blocked AVX-512
loops instead (2.4× MKL's rate at the step's shapes on a Zen 5 EPYC, `bench/micro.py`).

:class:`FrozenProduct` uses the kernels wherever the processor has AVX-512F: packed once, they
beat MKL's products on AMD (2.4×) and on Intel's AVX-512 processors too (a query step's two
products with them 0.97 ms against MKL's 1.09 ms on a Xeon, 2 threads).
:func:`times`, :func:`times_transposed` and :func:`transposed_times`, whose matrix changes
every call and is packed anew, use them only on AVX-512 processors other than Intel's: on
Intel's MKL's AVX-512 products run at the kernels' rate and the packing made reference
training 20 % slower.
Processors with AVX2 and FMA but no AVX-512 (Zen 2 and 3, Intel's client cores) have AVX2
kernels too, for frozen matrices only: on a Zen 3 EPYC they ran at MKL's rate in a loop (156
and 166 GFLOP/s against 158 and 166 on two threads), and in query training, where each
thread's rows are the ones the likelihood core reads next and ``W`` is not copied each call,
epochs took 6 % less (the fastest of 30–40 epochs, alternated in one process, four runs).
``HUBARCHES_GEMM=kernels`` uses the kernels for every product wherever either instruction
set is present, ``HUBARCHES_GEMM=torch`` never. With the kernels each output is one thread's
sum in a fixed order, the same on both instruction sets, so a run repeats bitwise whatever
the thread count.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import torch

try:
    from hubarches import _fastgemm
except ImportError:  # built without a C compiler: torch.mm does the products
    _fastgemm = None

__all__ = [
    "GEMM_ENV",
    "FrozenProduct",
    "Stacked",
    "kernels_available",
    "kernels_isa",
    "kernels_supported",
    "times",
    "times_transposed",
    "transposed_times",
]

GEMM_ENV = "HUBARCHES_GEMM"
"""``torch``: ``torch.mm`` for every product; ``kernels``: the kernels for every product
wherever AVX-512F or AVX2 is present; unset or ``auto``: the kernels for frozen matrices
wherever either is present, and for changing ones on AVX-512 processors that are not
Intel's."""


def _setting() -> str:
    value = os.environ.get(GEMM_ENV, "auto").strip().lower()
    return value if value in ("torch", "kernels") else "auto"


def kernels_isa() -> str:
    """The kernels built and runnable here: ``"avx512"``, ``"avx2"``, or ``""`` for none."""
    return "" if _fastgemm is None else str(_fastgemm.isa())


def kernels_supported() -> bool:
    """Whether the kernels (AVX-512 or AVX2) are built and this processor can run them."""
    return kernels_isa() != ""


def kernels_available(*, frozen: bool = False) -> bool:
    """Whether products use the kernels by default here (see :data:`GEMM_ENV`).

    ``frozen``: for a matrix packed once (:class:`FrozenProduct`); otherwise for one packed
    anew each call (:func:`times` and its kin).
    """
    setting = _setting()
    if setting == "torch" or not kernels_supported():
        return False
    if setting == "kernels":
        return True
    assert _fastgemm is not None
    return frozen or (kernels_isa() == "avx512" and not _fastgemm.intel())


def _plain(t: torch.Tensor, shape: tuple[int, int]) -> bool:
    """A float32 CPU matrix of ``shape`` with contiguous rows."""
    return (
        t.device.type == "cpu"
        and t.dtype == torch.float32
        and tuple(t.shape) == shape
        and (t.stride(1) == 1 or shape[1] <= 1)
    )


def _call(
    run: Callable[..., None],
    m: int,
    n: int,
    k: int,
    a: torch.Tensor,
    packed: torch.Tensor,
    out: torch.Tensor,
) -> torch.Tensor:
    """One kernel call (``gemm_nt``, ``gemm_nn`` or ``gemm_tn``) on torch's thread count."""
    run(
        m, n, k, a.data_ptr(), a.stride(0), packed.data_ptr(), out.data_ptr(), out.stride(0),
        torch.get_num_threads(),
    )  # fmt: skip
    return out


class FrozenProduct:
    """``H Wᵀ`` and ``G W`` for one matrix ``W [n, k]`` that does not change.

    ``W`` is packed at construction for the kernels (two copies of its size), so it must not
    change while the product is used. Without the kernels both products are ``torch.mm``.
    """

    def __init__(self, weight: torch.Tensor, *, use_kernels: bool | None = None) -> None:
        if weight.dim() != 2:
            raise ValueError(f"FrozenProduct needs a matrix, got shape {list(weight.shape)}")
        self.weight = weight.detach()
        self.n, self.k = (int(s) for s in weight.shape)
        wanted = kernels_available(frozen=True) if use_kernels is None else use_kernels
        allowed = kernels_supported() and _setting() != "torch"
        self.uses_kernels = bool(wanted and allowed and _plain(self.weight, (self.n, self.k)))
        self._rows = self._columns = None
        if self.uses_kernels and self.n * self.k > 0:
            assert _fastgemm is not None
            w = self.weight.contiguous()
            size = _fastgemm.packed_size(self.n, self.k)
            self._rows, self._columns = torch.empty(size), torch.empty(size)
            for packed, transposed in ((self._rows, True), (self._columns, False)):
                _fastgemm.pack(
                    w.data_ptr(), self.n, self.k, self.k, packed.data_ptr(), transposed,
                    torch.get_num_threads(),
                )  # fmt: skip

    def forward(self, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out [m, n] = h [m, k] Wᵀ``; returns ``out``."""
        m = h.shape[0]
        if not (self._kernel_ready(m) and _plain(h, (m, self.k)) and _plain(out, (m, self.n))):
            return torch.mm(h, self.weight.t(), out=out)
        assert _fastgemm is not None
        assert self._rows is not None
        return _call(_fastgemm.gemm_nt, m, self.n, self.k, h, self._rows, out)

    def backward(self, g: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out [m, k] = g [m, n] W``; returns ``out``."""
        m = g.shape[0]
        if not (self._kernel_ready(m) and _plain(g, (m, self.n)) and _plain(out, (m, self.k))):
            return torch.mm(g, self.weight, out=out)
        assert _fastgemm is not None
        assert self._columns is not None
        return _call(_fastgemm.gemm_nn, m, self.n, self.k, g, self._columns, out)

    def bind_forward(self, h: torch.Tensor, out: torch.Tensor) -> Callable[[], torch.Tensor]:
        """``forward(h, out)`` with its checks done now, for buffers reused call after call.

        The returned call reads ``h`` and writes ``out`` wherever they are then, so they must
        stay allocated (it keeps them) and keep their shape. A query step made ~2 µs of
        checks per product on buffers that never change.
        """
        return self._bind(h, out, transposed=True)

    def bind_backward(self, g: torch.Tensor, out: torch.Tensor) -> Callable[[], torch.Tensor]:
        """``backward(g, out)`` with its checks done now (see :meth:`bind_forward`)."""
        return self._bind(g, out, transposed=False)

    def _bind(
        self, a: torch.Tensor, out: torch.Tensor, *, transposed: bool
    ) -> Callable[[], torch.Tensor]:
        """One product on fixed buffers: the kernel's arguments computed once."""
        m = a.shape[0]
        n_a, n_out = (self.k, self.n) if transposed else (self.n, self.k)
        if not (self._kernel_ready(m) and _plain(a, (m, n_a)) and _plain(out, (m, n_out))):
            weight = self.weight.t() if transposed else self.weight
            return lambda: torch.mm(a, weight, out=out)
        assert _fastgemm is not None
        packed = self._rows if transposed else self._columns
        assert packed is not None
        run = _fastgemm.gemm_nt if transposed else _fastgemm.gemm_nn
        arguments = (
            m, self.n, self.k, a.data_ptr(), a.stride(0), packed.data_ptr(), out.data_ptr(),
            out.stride(0),
        )  # fmt: skip
        kept = (a, out, packed)

        def call() -> torch.Tensor:
            run(*arguments, torch.get_num_threads())
            return kept[1]

        return call

    def _kernel_ready(self, m: int) -> bool:
        """Kernels on and every dimension non-zero (empty products go to torch)."""
        return self.uses_kernels and m > 0 and self.n > 0 and self.k > 0


_scratch = threading.local()


def _packing_buffer(size: int) -> torch.Tensor:
    """A per-thread buffer for packing a matrix that changes, kept between calls.

    A fresh 2 MB allocation every step could cost page faults that took longer than the product.
    """
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < size:
        buffer = torch.empty(size)
        _scratch.buffer = buffer
    return buffer


Stacked = tuple[torch.Tensor, torch.Tensor]
"""Two matrices ``[n1, k]`` and ``[n2, k]`` taken as one ``[n1 + n2, k]``, the first's rows
first: the decoder's two heads, which the kernels read in place instead of from a copy made
by ``torch.cat`` each step (a fresh 2 MB, 0.1–0.5 ms a reference step on a Zen 4)."""


def _parts(w: torch.Tensor | Stacked) -> tuple[torch.Tensor, ...]:
    """The matrices ``w`` stacks: itself, or the pair."""
    return w if isinstance(w, tuple) else (w,)


def _whole(w: torch.Tensor | Stacked) -> torch.Tensor:
    """``w`` as one tensor (a copy of a :data:`Stacked` pair): for ``torch.mm``."""
    return torch.cat(w) if isinstance(w, tuple) else w


def _stacked_shape(w: torch.Tensor | Stacked) -> tuple[int, int] | None:
    """``(n, k)`` of ``w`` (the pair's rows summed); None unless every part is 2-D of one k."""
    parts = _parts(w)
    if any(p.dim() != 2 or p.shape[1] != parts[0].shape[1] for p in parts):
        return None
    return sum(p.shape[0] for p in parts), parts[0].shape[1]


def _kernels_take(
    a: torch.Tensor, w: torch.Tensor | Stacked, out: torch.Tensor, shapes: tuple
) -> bool:
    a_shape, w_shape, out_shape = shapes
    return (
        kernels_available()
        and 0 not in (*a_shape, *w_shape)
        and _plain(a, a_shape)
        and all(
            _plain(p, (p.shape[0], w_shape[1])) and p.stride(0) == w_shape[1] for p in _parts(w)
        )
        and _plain(out, out_shape)
    )


def _packed(matrix: torch.Tensor | Stacked, rows: int, cols: int, transposed: bool) -> torch.Tensor:
    """``matrix [rows, cols]`` packed for ``gemm_nt`` (transposed) or ``gemm_nn``/``gemm_tn``.

    Into this thread's buffer; the caller has checked the shape.
    """
    assert _fastgemm is not None
    parts = _parts(matrix)
    packed = _packing_buffer(_fastgemm.packed_size(rows, cols))
    second = (parts[1].data_ptr(), parts[0].shape[0]) if len(parts) > 1 else ()
    _fastgemm.pack(
        parts[0].data_ptr(), rows, cols, cols, packed.data_ptr(), transposed,
        torch.get_num_threads(), *second,
    )  # fmt: skip
    return packed


def _changing(
    a: torch.Tensor, w: torch.Tensor | Stacked, out: torch.Tensor, transposed: bool
) -> bool:
    """Run ``a wᵀ`` (transposed) or ``a w`` into ``out`` on the kernels; False where they can't.

    ``w`` is packed into this thread's buffer first. False means nothing was done.
    """
    shape = _stacked_shape(w)
    if shape is None or a.dim() != 2:
        return False
    n, k = shape
    m, inner, cols = a.shape[0], (k if transposed else n), (n if transposed else k)
    if a.shape[1] != inner:
        return False
    if not _kernels_take(a, w, out, ((m, inner), (n, k), (m, cols))):
        return False
    assert _fastgemm is not None
    run = _fastgemm.gemm_nt if transposed else _fastgemm.gemm_nn
    _call(run, m, n, k, a, _packed(w, n, k, transposed), out)
    return True


def times_transposed(h: torch.Tensor, w: torch.Tensor | Stacked, out: torch.Tensor) -> torch.Tensor:
    """``out [m, n] = h [m, k] wᵀ`` for a matrix ``w [n, k]`` that may change between calls.

    ``w`` (or a :data:`Stacked` pair) is packed anew each call, into a per-thread buffer;
    ``torch.mm`` where the kernels do not run.
    """
    return out if _changing(h, w, out, True) else torch.mm(h, _whole(w).t(), out=out)


def times(g: torch.Tensor, w: torch.Tensor | Stacked, out: torch.Tensor) -> torch.Tensor:
    """``out [m, k] = g [m, n] w`` for a matrix ``w [n, k]`` that may change between calls.

    ``w`` may be a :data:`Stacked` pair, read in place.
    """
    return out if _changing(g, w, out, False) else torch.mm(g, _whole(w), out=out)


def transposed_times(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out [n, k] = a [m, n]ᵀ b [m, k]``: a weight gradient, on the kernels where they run.

    ``b`` is packed into this thread's buffer; ``torch.mm`` elsewhere.
    """
    m, n = a.shape[0], a.shape[-1]
    k = b.shape[-1]
    if a.dim() != 2 or b.dim() != 2 or b.shape[0] != m:
        return torch.mm(a.t(), b, out=out)
    if not _kernels_take(a, b, out, ((m, n), (m, k), (n, k))):
        return torch.mm(a.t(), b, out=out)
    assert _fastgemm is not None
    return _call(_fastgemm.gemm_tn, m, n, k, a, _packed(b, m, k, False), out)
