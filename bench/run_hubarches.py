"""One hubarches run for the harness: reference training → alignment → surgery → query → embed.

Run by ``bench/compare.py`` in a fresh process (so its peak RSS is hubarches' alone); it calls
the pipeline's pieces one by one to time each phase, and writes a JSON result and the latents.

    .venv/bin/python bench/run_hubarches.py --ref R.h5ad --query Q.h5ad --json out.json \
        --latents out.npz --ref-epochs 20 --query-epochs 20 --threads 2
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import anndata as ad
import exchange
import numpy as np
import torch
from common import (
    BATCH_KEY,
    EMBED_REPEATS,
    LABEL_KEY,
    TRAIN_FRACTION,
    EpochClock,
    Phases,
    peak_rss_mb,
    save_latents,
    train_rows,
    write_json,
)

import hubarches
from hubarches.batching import CountMatrix, embed_matrix
from hubarches.config import ModelConfig
from hubarches.data import prepare_query, prepare_reference
from hubarches.model import CVAE, build_model
from hubarches.surgery import grow, plan_surgery
from hubarches.train import TrainOptions, train_query, train_reference

# scvi-tools' SCVI(n_latent=10, n_hidden=128, n_layers=1, zinb), scArches variant.
ARCHITECTURE = {
    "n_latent": 10,
    "n_hidden": 128,
    "n_layers": 1,
    "dropout": 0.1,
    "likelihood": "zinb",
    "dispersion": "gene",
    "covariate_injection": "all",
    "encode_covariates": True,
    "encoder_norm": "layer",
    "decoder_norm": "layer",
}


def _subset(counts: CountMatrix, codes: np.ndarray, rows: np.ndarray):
    """The training cells only (what scvi-tools' 90 % split trains on)."""
    return CountMatrix.from_matrix(counts.csr[rows]), codes[rows]


def _pieces(model: CVAE) -> list[tuple[str, slice | None, torch.Tensor]]:
    """Each reference tensor with the exchange key it belongs to (and its columns there)."""
    enc, dec = model.encoder, model.decoder
    if dec.dropout_logits is None or not isinstance(model.dispersion, torch.nn.Parameter):
        raise exchange.ExchangeError("the exchange covers ZINB models with gene dispersion")
    e0, d0 = enc.mlp.blocks[0].linear, dec.mlp.blocks[0].linear
    g, lat = model.config.n_genes, model.config.n_latent
    return [
        (exchange.ENC_W, slice(0, g), e0.expression.weight),
        (exchange.ENC_W, slice(g, None), e0.covariates[0].weight),
        (exchange.ENC_B, None, e0.expression.bias),
        (exchange.MEAN_W, None, enc.mean.weight),
        (exchange.MEAN_B, None, enc.mean.bias),
        (exchange.VAR_W, None, enc.log_var.weight),
        (exchange.VAR_B, None, enc.log_var.bias),
        (exchange.DEC_W, slice(0, lat), d0.expression.weight),
        (exchange.DEC_W, slice(lat, None), d0.covariates[0].weight),
        (exchange.DEC_B, None, d0.expression.bias),
        (exchange.SCALE_W, None, dec.scale.weight),
        (exchange.SCALE_B, None, dec.scale.bias),
        (exchange.DROP_W, None, dec.dropout_logits.weight),
        (exchange.DROP_B, None, dec.dropout_logits.bias),
        (exchange.PX_R, None, model.dispersion),
    ]


def export_reference(model: CVAE, genes: list[str], batches: list[str], path: str) -> None:
    """Write the trained reference's tensors for scvi-tools (``cross.py``)."""
    parts: dict[str, list[np.ndarray]] = {}
    for key, _, tensor in _pieces(model):  # column pieces come in column order
        parts.setdefault(key, []).append(tensor.detach().cpu().numpy())
    tensors = {k: v[0] if len(v) == 1 else np.concatenate(v, axis=1) for k, v in parts.items()}
    exchange.save(path, tensors, genes, batches)


def import_reference(model: CVAE, genes: list[str], batches: list[str], path: str) -> None:
    """Load a reference trained by scvi-tools into ``model`` and mark it trained."""
    loaded = exchange.load(path, genes, batches)
    with torch.no_grad():
        for key, columns, target in _pieces(model):
            value = torch.from_numpy(loaded[key] if columns is None else loaded[key][:, columns])
            if target.shape != value.shape:
                raise exchange.ExchangeError(
                    f"{key}: shape {tuple(value.shape)}, expected {tuple(target.shape)}"
                )
            target.copy_(value)
        model.trained.fill_(True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", required=True)
    ap.add_argument("--query", required=True)
    ap.add_argument("--json", required=True, help="result file")
    ap.add_argument("--latents", required=True, help=".npz with both latents and labels")
    ap.add_argument("--ref-epochs", type=int, default=20)
    ap.add_argument("--query-epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--kl-warmup", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--split",
        choices=["subset", "validation"],
        default="subset",
        help="subset: train on a random 90%% of cells, no per-epoch validation (the peer's "
        "work); validation: TrainOptions(validation_fraction=0.1), which also computes a "
        "validation loss every epoch (counted in the epoch time)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--save-reference", help="write the trained reference for scvi-tools (.npz)")
    ap.add_argument(
        "--load-reference",
        help="start from a reference trained by scvi-tools (.npz from peer_scvi.py "
        "--save-reference) instead of training one",
    )
    ap.add_argument(
        "--query-dropout",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the encoder's dropout on during query training (TrainOptions.dropout_in_query),"
        " as scvi-tools' load_query_data leaves it (freeze_dropout=False); default on",
    )
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    t = Phases()
    with t("read"):
        ref = ad.read_h5ad(args.ref)
        query = ad.read_h5ad(args.query)

    validation = 1.0 - TRAIN_FRACTION if args.split == "validation" else 0.0
    common = {
        "batch_size": args.batch_size,
        "lr": args.lr,
        "kl_warmup_epochs": args.kl_warmup,
        "seed": args.seed,
        "validation_fraction": validation,
        "device": args.device,
    }
    ref_options = TrainOptions(epochs=args.ref_epochs, **common)  # weight decay 1e-6, as scvi
    query_options = TrainOptions(
        epochs=args.query_epochs,
        weight_decay=0.0,
        dropout_in_query=args.query_dropout,
        **common,
    )

    # --- reference ---------------------------------------------------------------------
    with t("ref_setup"):
        prepared = prepare_reference(ref, batch_key=BATCH_KEY, label_key=LABEL_KEY)
        config = ModelConfig(
            n_genes=len(prepared.genes),
            covariate_sizes=tuple(len(c) for _, c in prepared.covariates),
            **ARCHITECTURE,
        )
        model = build_model(config, seed=args.seed)
        ref_counts = CountMatrix.from_matrix(prepared.X)
        ref_codes = prepared.codes
        if args.split == "subset":
            rows = train_rows(ref_counts.n_cells, TRAIN_FRACTION, args.seed)
            train_counts, train_codes = _subset(ref_counts, ref_codes, rows)
        else:
            train_counts, train_codes = ref_counts, ref_codes
    genes, batches = list(prepared.genes), [str(c) for c in prepared.covariates[0][1]]
    clock = EpochClock()
    clock.start()
    with t("ref_train"):
        if args.load_reference:
            import_reference(model, genes, batches, args.load_reference)
            ref_loss, n_ref_train = None, 0
        else:
            history = train_reference(
                model,
                train_counts,
                train_codes,
                options=ref_options,
                progress=lambda *_: clock.tick(),
            )
            ref_loss, n_ref_train = history.final_loss, history.n_train_cells
    ref_epochs = clock.to_dict(n_ref_train)
    if args.save_reference:
        export_reference(model, genes, batches, args.save_reference)
    with t("ref_embed"):
        z_ref = embed_matrix(model, ref_counts, ref_codes, device=args.device)
    # Labels of the cells prepare_reference kept (it drops cells without counts).
    y_ref = np.asarray(prepared.label_categories)[prepared.label_codes]

    # --- query -------------------------------------------------------------------------
    with t("align"):
        pq = prepare_query(
            query, genes=prepared.genes, covariates=prepared.covariates, batch_key=BATCH_KEY
        )
    with t("surgery"):
        plan = plan_surgery(prepared.covariates, pq.covariates.new_categories)
        extension = grow(model, plan.n_new, seed=args.seed)
    q_counts = CountMatrix.from_matrix(pq.X)
    q_codes = pq.covariates.codes
    if args.split == "subset":
        rows = train_rows(q_counts.n_cells, TRAIN_FRACTION, args.seed)
        q_train_counts, q_train_codes = _subset(q_counts, q_codes, rows)
    else:
        q_train_counts, q_train_codes = q_counts, q_codes
    clock = EpochClock()
    clock.start()
    with t("query_train"):
        q_history = train_query(
            extension,
            q_train_counts,
            q_train_codes,
            options=query_options,
            progress=lambda *_: clock.tick(),
        )
    query_epochs = clock.to_dict(q_history.n_train_cells)
    with t("query_embed"):
        z_query = embed_matrix(extension, q_counts, q_codes, device=args.device)
    for again in EMBED_REPEATS:  # steady throughput: the first pass also pays warm-up
        with t(again):
            embed_matrix(model, ref_counts, ref_codes, device=args.device)

    save_latents(
        args.latents,
        z_ref=z_ref,
        y_ref=y_ref,
        z_query=z_query,
        y_query=query.obs[LABEL_KEY].astype(str).to_numpy(),
    )
    write_json(
        args.json,
        {
            "tool": "hubarches",
            "versions": {
                "hubarches": hubarches.__version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "threads": torch.get_num_threads(),
            "split": args.split,
            "query_dropout": args.query_dropout,
            "data": {
                "n_ref": int(ref_counts.n_cells),
                "n_query": int(q_counts.n_cells),
                "n_genes_ref": int(ref_counts.n_genes),
                "n_genes_query_input": int(query.n_vars),
            },
            "phases": t.to_dict(),
            "ref_epochs": ref_epochs,
            "query_epochs": query_epochs,
            "reference_from": args.load_reference,
            "final_losses": {"reference": ref_loss, "query": q_history.final_loss},
            "peak_rss_mb": peak_rss_mb(),
            "finished": time.time(),
        },
    )


if __name__ == "__main__":
    main()
