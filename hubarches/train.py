"""Training loops in plain PyTorch: the reference, and the query after surgery. No I/O.

Both return a :class:`History`. Reference training optimises every tensor with Adam and a
linear KL warm-up (scvi-tools' defaults). Query training optimises only the tensors added by
surgery; everything from the reference stays frozen, normalization layers stay in eval mode,
and the first encoder layer's expression product ``W_x log1p(x) + b`` is computed once per
cell instead of every epoch, which is exact because ``W_x`` and ``b`` never change.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from hubarches.batching import Counts, Minibatch, nonzero_coordinates, pick_device
from hubarches.config import QUERY_DEFAULTS, TrainOptions, default_epochs
from hubarches.errors import ModelError, SurgeryError, TrainingError
from hubarches.fastlik import (
    CsrRows,
    compile_wanted,
    compiled,
    nonzero_log_gamma,
    stored_log_gamma,
)
from hubarches.fastnet import AdamSettings, query_step
from hubarches.fastref import reference_step
from hubarches.model import CVAE, LossTerms
from hubarches.nn import CovariateWeight
from hubarches.optim import Adam
from hubarches.surgery import freeze_reference, new_parameters

__all__ = [
    "EpochStats",
    "History",
    "TrainOptions",
    "default_epochs",
    "train_query",
    "train_reference",
]


@dataclass(frozen=True)
class EpochStats:
    """Mean per-cell losses of one epoch (validation ones when a split is held out)."""

    epoch: int
    loss: float
    reconstruction: float
    kl: float
    kl_weight: float
    validation_loss: float | None = None


@dataclass
class History:
    """What training did: per-epoch statistics and whether it stopped early."""

    epochs: list[EpochStats] = field(default_factory=list)
    stopped_early: bool = False
    n_train_cells: int = 0
    n_validation_cells: int = 0

    @property
    def final_loss(self) -> float | None:
        """The last epoch's mean training loss."""
        return self.epochs[-1].loss if self.epochs else None

    def to_dict(self) -> dict[str, object]:
        """A JSON-able summary."""
        last = self.epochs[-1] if self.epochs else None
        return {
            "epochs": len(self.epochs),
            "stopped_early": self.stopped_early,
            "n_train_cells": self.n_train_cells,
            "n_validation_cells": self.n_validation_cells,
            "final_loss": None if last is None else last.loss,
            "final_reconstruction": None if last is None else last.reconstruction,
            "final_kl": None if last is None else last.kl,
            "final_validation_loss": None if last is None else last.validation_loss,
        }


Progress = Callable[[EpochStats, int], None]
"""Called after each epoch with its statistics and the planned number of epochs."""

StepLoss = Callable[[np.ndarray, Minibatch, torch.Generator], LossTerms]
FusedStep = Callable[[np.ndarray, Minibatch, torch.Generator, float], tuple[float, float, float]]
"""A whole training step, gradients and Adam's update (``QueryStep``): ``(rows, batch,
generator, KL weight) -> (loss, reconstruction, KL)``, batch means."""
"""Loss terms of a minibatch given its row indices and its counts."""


def _split(n: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random train/validation row indices."""
    order = rng.permutation(n)
    n_val = math.floor(n * fraction)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def _kl_weight(epoch: int, warmup: int) -> float:
    """Linear KL warm-up from 0 at the first epoch to 1 after ``warmup`` epochs."""
    return min(1.0, epoch / warmup) if warmup > 0 else 1.0


def _run(
    model: CVAE,
    parameters: Sequence[torch.nn.Parameter],
    step_loss: StepLoss,
    counts: Counts,
    rows: np.ndarray,
    options: TrainOptions,
    *,
    set_mode: Callable[[], None],
    progress: Progress | None,
    fused: FusedStep | None = None,
) -> History:
    """The epoch loop shared by reference and query training, over the cells ``rows``."""
    epochs = options.epochs if options.epochs is not None else default_epochs(len(rows))
    rng = np.random.default_rng(options.seed)
    val_fraction = options.validation_fraction
    if options.early_stopping_patience is not None and val_fraction == 0.0:
        val_fraction = 0.1
    train_idx, val_idx = _split(len(rows), val_fraction, rng)
    train_rows, val_rows = rows[train_idx], rows[val_idx]
    history = History(n_train_cells=len(train_rows), n_validation_cells=len(val_rows))
    if len(train_rows) == 0 or not parameters or epochs == 0:
        return history
    steps = epochs * math.ceil(len(train_rows) / options.batch_size)
    with compiled(compile_wanted(steps, options.compile)):
        _epochs(
            model,
            parameters,
            step_loss,
            counts,
            (train_rows, val_rows),
            epochs,
            options,
            history=history,
            set_mode=set_mode,
            progress=progress,
            fused=fused,
        )
    model.eval()
    return history


def _epochs(
    model: CVAE,
    parameters: Sequence[torch.nn.Parameter],
    step_loss: StepLoss,
    counts: Counts,
    split: tuple[np.ndarray, np.ndarray],
    epochs: int,
    options: TrainOptions,
    *,
    history: History,
    set_mode: Callable[[], None],
    progress: Progress | None,
    fused: FusedStep | None,
) -> None:
    """Run the epochs, appending to ``history``; stop early when validation stalls.

    ``fused``, when given, runs each training step, gradients and update, in place of
    ``step_loss``, autograd and the optimizer (validation still uses ``step_loss``).
    """
    train_rows, val_rows = split
    rng = np.random.default_rng([options.seed, 1])
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    generator = torch.Generator(device=device).manual_seed(options.seed)
    optimizer = None if fused is not None else _adam(parameters, options)
    best, since_best = math.inf, 0
    for epoch in range(epochs):
        kl_weight = _kl_weight(epoch, options.kl_warmup_epochs)
        set_mode()
        # Sums stay on the device: reading a loss back every step would synchronise a GPU.
        sums = torch.zeros(3, device=device, dtype=torch.float64)
        host_sums = [0.0, 0.0, 0.0]  # the fused step's, already on the host (Python floats:
        # a numpy call costs ~20 µs between a step's large products)
        seen = 0
        for batch_rows, batch in counts.batches(train_rows, options.batch_size, rng):
            if len(batch_rows) < 2 and len(train_rows) > 1:
                continue  # a one-cell batch would break batch norm and adds only noise
            batch = batch.to(device, dtype)
            if fused is not None:
                step_terms = fused(batch_rows, batch, generator, kl_weight)
                for k in range(3):
                    host_sums[k] += len(batch_rows) * step_terms[k]
            else:
                assert optimizer is not None
                terms = step_loss(batch_rows, batch, generator)
                loss = terms.total(kl_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                with torch.no_grad():
                    part = torch.stack([loss, terms.reconstruction.mean(), terms.kl.mean()])
                sums += len(batch_rows) * part.double()
            seen += len(batch_rows)
        mean = (sums.cpu().numpy() + np.asarray(host_sums)) / max(seen, 1)
        if not np.all(np.isfinite(mean)):
            raise TrainingError(
                f"the loss became non-finite in epoch {epoch}",
                hint="Check that the input holds raw counts, or lower the learning rate",
            )
        val_loss = None
        if len(val_rows):
            val_loss = _validation_loss(model, step_loss, counts, val_rows, rng, generator)
        stats = EpochStats(
            epoch, float(mean[0]), float(mean[1]), float(mean[2]), kl_weight, val_loss
        )
        history.epochs.append(stats)
        if progress is not None:
            progress(stats, epochs)
        if options.early_stopping_patience is not None and val_loss is not None:
            if val_loss < best:
                best, since_best = val_loss, 0
            else:
                since_best += 1
                if since_best >= options.early_stopping_patience:
                    history.stopped_early = True
                    break


def _adam(parameters: Sequence[torch.nn.Parameter], options: TrainOptions) -> Adam:
    """Adam with scvi-tools' settings, on torch's fused kernel where this torch has one."""
    return Adam(parameters, lr=options.lr, eps=options.adam_eps, weight_decay=options.weight_decay)


def _validation_loss(
    model: CVAE,
    step_loss: StepLoss,
    counts: Counts,
    rows: np.ndarray,
    rng: np.random.Generator,
    generator: torch.Generator,
) -> float:
    """Mean ELBO loss (KL weight 1) of the held-out cells, in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    total = torch.zeros((), device=device, dtype=torch.float64)
    with torch.no_grad():
        for batch_rows, batch in counts.batches(rows, 1024, rng):
            terms = step_loss(batch_rows, batch.to(device, dtype), generator)
            total += terms.total(1.0).double() * len(batch_rows)
    return float(total) / len(rows)


def _check_codes(model: CVAE, counts: Counts, codes: np.ndarray) -> torch.Tensor:
    """Validate covariate codes against the model and return them as a tensor."""
    cfg = model.config
    if counts.n_genes != cfg.n_genes:
        raise ModelError(f"the model has {cfg.n_genes} genes, the counts {counts.n_genes}")
    if codes.ndim != 2 or codes.shape != (counts.n_cells, len(cfg.covariate_sizes)):
        raise ModelError(
            f"covariate codes must have shape [{counts.n_cells}, {len(cfg.covariate_sizes)}],"
            f" got {list(codes.shape)}"
        )
    if codes.size and ((codes < 0).any() or (codes >= np.array(cfg.covariate_sizes)).any()):
        raise ModelError(f"covariate codes out of range for categories {cfg.covariate_sizes}")
    return torch.as_tensor(codes, dtype=torch.int64)


def train_reference(
    model: CVAE,
    counts: Counts,
    codes: np.ndarray,
    *,
    options: TrainOptions | None = None,
    progress: Progress | None = None,
) -> History:
    """Train every tensor of a fresh model on reference counts; marks it trained."""
    options = options or TrainOptions()
    codes_t = _check_codes(model, counts, codes)
    library = counts.library()  # one pass over the counts, used twice
    if (library <= 0).any():
        raise ModelError("every reference cell needs at least one count; drop empty cells")
    device = pick_device(options.device)
    model.to(device)
    for p in model.parameters():
        p.requires_grad_(True)

    factorial = data_log_factorial(counts).to(device)
    log_library = _log_library(library).to(device)
    fused = reference_step(
        model,
        codes_t,
        log_library=log_library,
        factorial=factorial,
        adam=AdamSettings(lr=options.lr, eps=options.adam_eps, weight_decay=options.weight_decay),
    )

    def step_loss(rows: np.ndarray, batch: Minibatch, generator: torch.Generator) -> LossTerms:
        index = torch.as_tensor(rows, device=device)
        return model.loss(
            batch.x,
            codes_t[rows].to(device),
            generator=generator,
            nonzero=batch.stored_counts(),
            factorial=factorial[index],
            log_library=log_library[index],
            x_log=batch.x_log,
        )

    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(options.seed)  # dropout masks
        history = _run(
            model,
            list(model.parameters()),
            step_loss,
            counts,
            np.arange(counts.n_cells),
            options,
            set_mode=model.train,
            progress=progress,
            fused=fused,
        )
    model.trained.fill_(True)
    return history


def _log_library(library: np.ndarray) -> torch.Tensor:
    """``log Σ_g x_g`` of every cell from its library size (−inf where it is 0)."""
    return torch.log(torch.from_numpy(library.astype(np.float32)))


def data_log_factorial(counts: Counts, *, block: int = 8192) -> torch.Tensor:
    """``Σ_g log Γ(x_g + 1)`` of every cell: part of the likelihood that never changes.

    Summed straight off each block's stored values, so the extra memory is one float64 per
    stored count of a block (the coordinates of all nonzeros were ~1 GB at 50k cells).
    """
    out = torch.empty(counts.n_cells, dtype=torch.float64)
    for start, part in counts.blocks(block):
        csr = part.csr
        terms = torch.lgamma(torch.from_numpy(np.asarray(csr.data, dtype=np.float64)) + 1.0)
        sums = np.zeros(part.n_cells, dtype=np.float64)
        filled = np.flatnonzero(np.diff(csr.indptr))
        if filled.size:
            sums[filled] = np.add.reduceat(terms.numpy(), csr.indptr[filled])
        out[start : start + part.n_cells] = torch.from_numpy(sums)
    return out.float()


def first_layer_expression(model: CVAE, counts: Counts, *, block: int = 1024) -> torch.Tensor:
    """``W_x log1p(x) + b`` of the first encoder layer for every cell, computed once."""
    first = model.encoder.mlp.blocks[0].linear.expression
    device, dtype = first.weight.device, first.weight.dtype
    out = torch.empty(counts.n_cells, first.out_features, device=device, dtype=dtype)
    buffer = np.empty((min(block, counts.n_cells), counts.n_genes), dtype=np.float32)
    with torch.no_grad():
        for start, part in counts.blocks(block):
            x_log = part.dense_log1p(buffer).to(device, dtype)
            out[start : start + part.n_cells] = first(x_log)
    return out


def _dispersion_trains(model: CVAE) -> bool:
    """Whether any dispersion parameter is trainable (new batches, gene-batch dispersion)."""
    disp = model.dispersion
    if isinstance(disp, torch.nn.Module):
        return any(p.requires_grad for p in disp.parameters())
    return disp is not None and disp.requires_grad


def frozen_log_gamma(
    model: CVAE, counts: Counts, codes: torch.Tensor, *, block: int = 4096
) -> torch.Tensor | None:
    """The likelihood's log-gamma terms per cell, when the dispersion they use is frozen.

    They depend only on the counts and θ; with θ frozen they are constants of query
    training, computed once here instead of every step. None when θ trains (new batches
    with gene-batch dispersion).
    """
    if _dispersion_trains(model):
        return None
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    out = torch.empty(counts.n_cells, device=device, dtype=dtype)
    with torch.no_grad():
        for start, part in counts.blocks(block):
            stop = start + part.n_cells
            log_theta = model.log_dispersion(codes[start:stop].to(device))
            theta = None if log_theta is None else torch.exp(log_theta)
            value = stored_log_gamma(theta, CsrRows(part.csr)) if device.type == "cpu" else None
            if value is None:
                rows, cols, values = (t.to(device) for t in nonzero_coordinates(part.csr))
                value = nonzero_log_gamma(theta, rows, cols, values.to(dtype), n_cells=part.n_cells)
            out[start:stop] = value
    return out


def _theta_free_log_gamma(model: CVAE, counts: Counts) -> torch.Tensor | None:
    """``−Σ log Γ(x+1)`` per cell, for gene-batch dispersion on the CPU; None otherwise.

    Where θ trains per batch, the hand-written query step (CPU only) takes the θ terms step
    by step (:mod:`hubarches.fasttheta`) and only these from here.
    """
    if not isinstance(model.dispersion, CovariateWeight):
        return None
    if next(model.parameters()).device.type != "cpu":
        return None  # no step by hand there: no pass over the counts for it
    return -data_log_factorial(counts)


def train_query(
    extension: CVAE,
    counts: Counts,
    codes: np.ndarray,
    *,
    options: TrainOptions | None = None,
    progress: Progress | None = None,
) -> History:
    """Train only the tensors surgery added; every reference tensor stays bitwise the same.

    Cells without counts are left out (the likelihood needs a library size).
    """
    options = options or QUERY_DEFAULTS
    codes_t = _check_codes(extension, counts, codes)
    trainable = new_parameters(extension)
    if not bool(extension.trained):
        raise SurgeryError("query training needs a model produced by surgery on a reference")
    device = pick_device(options.device)
    extension.to(device)
    freeze_reference(extension)
    library = counts.library()  # one pass over the counts, used twice
    keep = np.flatnonzero(library > 0)
    first_expression = first_layer_expression(extension, counts)
    log_gamma = frozen_log_gamma(extension, counts, codes_t)
    log_library = _log_library(library).to(device)
    fused = query_step(
        extension,
        codes_t,
        first_expression=first_expression,
        log_gamma=log_gamma if log_gamma is not None else _theta_free_log_gamma(extension, counts),
        log_library=log_library,
        dropout=options.dropout_in_query,
        adam=AdamSettings(lr=options.lr, eps=options.adam_eps, weight_decay=options.weight_decay),
    )

    def set_mode() -> None:
        # Frozen normalization statistics: everything in eval mode, dropout on only if asked.
        extension.eval()
        if options.dropout_in_query:
            for m in extension.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.train()

    def step_loss(rows: np.ndarray, batch: Minibatch, generator: torch.Generator) -> LossTerms:
        index = torch.as_tensor(rows, device=device)
        return extension.loss(
            batch.x,
            codes_t[rows].to(device),
            first_expression=first_expression[index],
            generator=generator,
            log_gamma=None if log_gamma is None else log_gamma[index],
            nonzero=batch.stored_counts(),
            log_library=log_library[index],
        )

    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(options.seed)
        return _run(
            extension,
            trainable,
            step_loss,
            counts,
            keep,
            options,
            set_mode=set_mode,
            progress=progress,
            fused=fused,
        )
