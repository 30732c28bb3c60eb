"""The architecture of a conditional VAE: everything needed to rebuild it exactly."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from hubarches.errors import ModelError

__all__ = [
    "QUERY_DEFAULTS",
    "Dispersion",
    "Injection",
    "Likelihood",
    "ModelConfig",
    "Normalization",
    "TrainOptions",
    "default_epochs",
]

Likelihood = Literal["nb", "zinb", "poisson"]
Dispersion = Literal["gene", "gene-batch"]
Injection = Literal["first", "all"]
Normalization = Literal["layer", "batch", "none"]

_LIKELIHOODS = ("nb", "zinb", "poisson")
_DISPERSIONS = ("gene", "gene-batch")
_INJECTIONS = ("first", "all")
_NORMS = ("layer", "batch", "none")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and options of a :class:`~hubarches.model.CVAE`.

    Defaults follow the scArches recommendations for reference mapping: covariates enter the
    encoder, layer norm and no batch norm, covariates injected into every hidden layer.
    ``covariate_sizes`` holds the number of categories of each categorical covariate in
    manifest order; the first covariate is the batch key (it indexes gene-batch dispersion).
    """

    n_genes: int
    covariate_sizes: tuple[int, ...]
    n_latent: int = 10
    n_hidden: int = 128
    n_layers: int = 1
    dropout: float = 0.1
    likelihood: Likelihood = "zinb"
    dispersion: Dispersion = "gene"
    covariate_injection: Injection = "all"
    encode_covariates: bool = True
    encoder_norm: Normalization = "layer"
    decoder_norm: Normalization = "layer"

    def __post_init__(self) -> None:
        object.__setattr__(self, "covariate_sizes", tuple(int(k) for k in self.covariate_sizes))
        problems = []
        if self.n_genes < 1:
            problems.append(f"n_genes must be ≥ 1, got {self.n_genes}")
        if not self.covariate_sizes:
            problems.append("at least one covariate (the batch key) is needed")
        if any(k < 1 for k in self.covariate_sizes):
            problems.append(f"every covariate needs ≥ 1 category, got {self.covariate_sizes}")
        if self.n_latent < 1 or self.n_hidden < 1:
            problems.append("n_latent and n_hidden must be ≥ 1")
        if not 1 <= self.n_layers <= 3:
            problems.append(f"n_layers must be 1, 2 or 3, got {self.n_layers}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        for name, value, allowed in (
            ("likelihood", self.likelihood, _LIKELIHOODS),
            ("dispersion", self.dispersion, _DISPERSIONS),
            ("covariate_injection", self.covariate_injection, _INJECTIONS),
            ("encoder_norm", self.encoder_norm, _NORMS),
            ("decoder_norm", self.decoder_norm, _NORMS),
        ):
            if value not in allowed:
                problems.append(f"{name} must be one of {allowed}, got {value!r}")
        if problems:
            raise ModelError("invalid model configuration: " + "; ".join(problems))

    @property
    def n_batches(self) -> int:
        """Categories of the batch key (the first covariate)."""
        return self.covariate_sizes[0]

    def with_covariate_sizes(self, sizes: tuple[int, ...]) -> ModelConfig:
        """The same architecture with other category counts (what surgery produces)."""
        return replace(self, covariate_sizes=tuple(sizes))


def default_epochs(n_cells: int) -> int:
    """scvi-tools' heuristic: about 20 000 × 400 cell-passes, at most 400 epochs."""
    return max(1, min(400, round(20_000 / max(n_cells, 1) * 400)))


@dataclass(frozen=True)
class TrainOptions:
    """Optimisation settings; defaults are scvi-tools' for the reference."""

    epochs: int | None = None
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-6
    adam_eps: float = 0.01
    kl_warmup_epochs: int = 400
    seed: int = 0
    validation_fraction: float = 0.0
    early_stopping_patience: int | None = None
    dropout_in_query: bool = False
    device: str = "auto"
    compile: bool | None = None
    """torch.compile the likelihood: None decides by run length (see hubarches.fastlik)."""

    def __post_init__(self) -> None:
        if self.epochs is not None and self.epochs < 0:
            raise ModelError(f"epochs must be ≥ 0, got {self.epochs}")
        if self.batch_size < 2:
            raise ModelError(f"batch_size must be ≥ 2, got {self.batch_size}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ModelError("validation_fraction must be in [0, 1)")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ModelError("early_stopping_patience must be ≥ 1")


QUERY_DEFAULTS = TrainOptions(weight_decay=0.0)
"""Query training: no weight decay (only new tensors are optimised anyway)."""
