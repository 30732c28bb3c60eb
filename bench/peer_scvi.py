"""One scvi-tools run for the harness, in the peer's own Python (hubarches is not imported).

The scArches variant of ``SCVI(n_latent=10, n_hidden=128, n_layers=1, gene_likelihood="zinb")``
(covariates encoded, layer norm, no batch norm), trained on the reference; then
``prepare_query_anndata`` (gene alignment), ``load_query_data`` (surgery), query training with
``weight_decay=0`` and the query latent. Same JSON result and latents as ``run_hubarches.py``.

    /path/to/peer/python bench/peer_scvi.py --ref R.h5ad --query Q.h5ad --json out.json \
        --latents out.npz --ref-epochs 20 --query-epochs 20 --threads 2
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

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
    write_json,
)

ARCHITECTURE = {
    "n_latent": 10,
    "n_hidden": 128,
    "n_layers": 1,
    "dropout_rate": 0.1,
    "gene_likelihood": "zinb",
    "dispersion": "gene",
    "encode_covariates": True,
    "deeply_inject_covariates": True,
    "use_layer_norm": "both",
    "use_batch_norm": "none",
}


def epoch_callback(clock: EpochClock):
    """A Lightning callback that ticks ``clock`` at the end of every training epoch."""
    from lightning.pytorch.callbacks import Callback

    class _Ticks(Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            clock.tick()

    return _Ticks()


def _batches(model) -> list[str]:
    """The batch categories in the order of the model's one-hot columns."""
    registry = model.adata_manager.get_state_registry("batch")
    return [str(c) for c in registry.categorical_mapping]


def export_reference(model, path: str) -> None:
    """Write the trained reference's tensors for hubarches (``cross.py``)."""
    state = model.module.state_dict()
    tensors = {k: state[k].detach().cpu().numpy() for k in exchange.KEYS}
    exchange.save(path, tensors, list(model.adata.var_names), _batches(model))


def import_reference(model, path: str) -> None:
    """Load a reference trained by hubarches into ``model`` and mark it trained."""
    state = model.module.state_dict()
    loaded = exchange.load(path, list(model.adata.var_names), _batches(model))
    for key, value in loaded.items():
        if tuple(state[key].shape) != value.shape:
            raise exchange.ExchangeError(f"{key}: shape {value.shape}, expected {state[key].shape}")
        state[key] = torch.from_numpy(value)
    model.module.load_state_dict(state)
    model.module.eval()  # as scvi-tools leaves a model after training: dropout off
    model.is_trained_ = True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", required=True)
    ap.add_argument("--query", required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--latents", required=True)
    ap.add_argument("--ref-epochs", type=int, default=20)
    ap.add_argument("--query-epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--kl-warmup", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-reference", help="write the trained reference for hubarches (.npz)")
    ap.add_argument(
        "--load-reference",
        help="start from a reference trained by hubarches (.npz from run_hubarches.py "
        "--save-reference) instead of training one",
    )
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import anndata as ad
    import lightning
    import scvi

    scvi.settings.seed = args.seed
    torch.set_num_threads(args.threads)  # scvi.settings may change it; pin again
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("scvi").setLevel(logging.WARNING)
    trainer = {
        "accelerator": "cpu",
        "devices": 1,
        "train_size": TRAIN_FRACTION,
        "batch_size": args.batch_size,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }

    def plan(weight_decay: float) -> dict[str, float]:
        return {"lr": args.lr, "weight_decay": weight_decay, "n_epochs_kl_warmup": args.kl_warmup}

    t = Phases()
    with t("read"):
        ref = ad.read_h5ad(args.ref)
        query = ad.read_h5ad(args.query)

    # --- reference ---------------------------------------------------------------------
    with t("ref_setup"):
        scvi.model.SCVI.setup_anndata(ref, batch_key=BATCH_KEY)
        model = scvi.model.SCVI(ref, **ARCHITECTURE)
    clock = EpochClock()
    clock.start()
    with t("ref_train"):
        if args.load_reference:
            import_reference(model, args.load_reference)
        else:
            model.train(
                max_epochs=args.ref_epochs,
                plan_kwargs=plan(1e-6),
                callbacks=[epoch_callback(clock)],
                **trainer,
            )
    if args.save_reference:
        export_reference(model, args.save_reference)
    ref_epochs = clock.to_dict(int(np.ceil(TRAIN_FRACTION * ref.n_obs)))
    with t("ref_embed"):
        z_ref = model.get_latent_representation(ref)

    # --- query -------------------------------------------------------------------------
    q = query.copy()
    with t("align"):
        scvi.model.SCVI.prepare_query_anndata(q, model)
    with t("surgery"):
        qmodel = scvi.model.SCVI.load_query_data(q, model)
    clock = EpochClock()
    clock.start()
    with t("query_train"):
        qmodel.train(
            max_epochs=args.query_epochs,
            plan_kwargs=plan(0.0),
            callbacks=[epoch_callback(clock)],
            **trainer,
        )
    query_epochs = clock.to_dict(int(np.ceil(TRAIN_FRACTION * q.n_obs)))
    with t("query_embed"):
        z_query = qmodel.get_latent_representation()
    for again in EMBED_REPEATS:  # steady throughput: the first pass also pays warm-up
        with t(again):
            model.get_latent_representation(ref)

    save_latents(
        args.latents,
        z_ref=z_ref,
        y_ref=ref.obs[LABEL_KEY].astype(str).to_numpy(),
        z_query=z_query,
        y_query=q.obs[LABEL_KEY].astype(str).to_numpy(),
    )
    write_json(
        args.json,
        {
            "tool": "scvi-tools",
            "versions": {
                "scvi-tools": scvi.__version__,
                "torch": torch.__version__,
                "lightning": lightning.__version__,
                "python": platform.python_version(),
            },
            "threads": torch.get_num_threads(),
            "split": "train_size=0.9",
            "reference_from": args.load_reference,
            "data": {
                "n_ref": int(ref.n_obs),
                "n_query": int(q.n_obs),
                "n_genes_ref": int(ref.n_vars),
                "n_genes_query_input": int(query.n_vars),
            },
            "phases": t.to_dict(),
            "ref_epochs": ref_epochs,
            "query_epochs": query_epochs,
            "peak_rss_mb": peak_rss_mb(),
            "finished": time.time(),
        },
    )


if __name__ == "__main__":
    main()
