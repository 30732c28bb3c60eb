"""Architectural surgery and frozen query training: the scArches invariants of DESIGN.md."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from hubarches import fastnet
from hubarches.batching import CountMatrix, embed_matrix
from hubarches.config import ModelConfig
from hubarches.errors import SurgeryError
from hubarches.model import CVAE, build_model
from hubarches.nn import CovariateWeight
from hubarches.surgery import covariate_weights, grow, new_parameters, plan_surgery
from hubarches.train import TrainOptions, train_query, train_reference

_C_STEP = fastnet._fastnet is not None  # the hand-written query step is built

N_GENES = 40


@dataclass
class Scenario:
    """A trained reference, the query's data and the extension after query training."""

    reference: CVAE
    extension: CVAE
    before: dict[str, torch.Tensor]
    ref_counts: CountMatrix
    ref_codes: np.ndarray
    n_new: tuple[int, ...]


def _counts(n: int, seed: int) -> CountMatrix:
    rng = np.random.default_rng(seed)
    x = rng.poisson(rng.gamma(2.0, 2.0, (1, N_GENES)), (n, N_GENES)).astype(np.float32)
    x[:, 0] += 1  # no empty cells
    return CountMatrix.from_matrix(x)


def _scenario(
    ref_sizes: tuple[int, ...],
    query_codes: list[list[int]],
    n_new: tuple[int, ...],
    **config: object,
) -> Scenario:
    """Train a tiny reference, grow it, train the query; codes index the extended categories."""
    cfg = ModelConfig(n_genes=N_GENES, covariate_sizes=ref_sizes, n_hidden=16, n_latent=4, **config)  # type: ignore[arg-type]
    reference = build_model(cfg, seed=0)
    ref_counts = _counts(60, seed=1)
    ref_codes = np.stack([np.arange(60) % k for k in ref_sizes], axis=1)
    train_reference(reference, ref_counts, ref_codes, options=TrainOptions(epochs=3, batch_size=16))
    extension = grow(reference, n_new, seed=0)
    before = {name: p.detach().clone() for name, p in extension.named_parameters()}
    before.update({name: b.clone() for name, b in extension.named_buffers()})
    q_codes = np.array(query_codes * 10)
    train_query(
        extension,
        _counts(len(q_codes), seed=2),
        q_codes,
        options=TrainOptions(epochs=3, batch_size=8, weight_decay=0.5, lr=0.05),
    )
    return Scenario(reference, extension, before, ref_counts, ref_codes, n_new)


SCENARIOS = {
    "first-layer injection": lambda: _scenario((3,), [[3], [4]], (2,), covariate_injection="first"),
    # Deeper layers without covariates: the first block grows, the ones after it do not.
    "first-layer injection, 2 hidden": lambda: _scenario(
        (3,), [[3], [4]], (2,), covariate_injection="first", n_layers=2
    ),
    "first-layer injection, 3 hidden, two covariates": lambda: _scenario(
        (3, 2), [[3, 2], [4, 0]], (2, 1), covariate_injection="first", n_layers=3
    ),
    "all layers, 2 hidden": lambda: _scenario((3,), [[3], [4]], (2,), n_layers=2),
    "all layers, 3 hidden": lambda: _scenario((3,), [[3], [4], [0]], (2,), n_layers=3),
    "two covariates, both new": lambda: _scenario(
        (3, 2), [[3, 2], [4, 3], [3, 3]], (2, 2), n_layers=2
    ),
    "two covariates, only second new": lambda: _scenario(
        (3, 2), [[0, 2], [1, 2], [2, 3]], (0, 2), n_layers=2
    ),
    "single-batch reference": lambda: _scenario((1,), [[1], [2]], (2,)),
    "known and new batches mixed": lambda: _scenario((3,), [[0], [3], [1], [4]], (2,)),
    "gene-batch dispersion": lambda: _scenario((3,), [[3], [4]], (2,), dispersion="gene-batch"),
    "batch norm, nb": lambda: _scenario(
        (3,), [[3], [4]], (2,), encoder_norm="batch", decoder_norm="batch", likelihood="nb"
    ),
    # Encoder and decoder normalised differently: each keeps its own frozen statistics.
    "batch-norm encoder, layer-norm decoder": lambda: _scenario(
        (3,), [[3], [4]], (2,), n_layers=2, encoder_norm="batch", decoder_norm="layer"
    ),
    "no-norm encoder, batch-norm decoder": lambda: _scenario(
        (3,), [[3], [4]], (2,), n_layers=2, encoder_norm="none", decoder_norm="batch"
    ),
}


@pytest.fixture(scope="module", params=list(SCENARIOS))
def scenario(request: pytest.FixtureRequest) -> Scenario:
    return SCENARIOS[request.param]()


def test_reference_embedding_is_bitwise_unchanged(scenario: Scenario) -> None:
    expected = embed_matrix(scenario.reference, scenario.ref_counts, scenario.ref_codes)
    got = embed_matrix(scenario.extension, scenario.ref_counts, scenario.ref_codes)
    assert np.abs(expected - got).max() == 0.0


def test_reference_tensors_unchanged_and_new_ones_trained(scenario: Scenario) -> None:
    ext = scenario.extension
    new_ids = {id(p) for p in new_parameters(ext)}
    for name, param in ext.named_parameters():
        if id(param) in new_ids:
            continue
        assert param.grad is None, f"{name} received a gradient"
        assert not param.requires_grad, name
        assert torch.equal(param, scenario.before[name]), name
    for name, buf in ext.named_buffers():
        assert torch.equal(buf, scenario.before[name]), f"buffer {name} changed"
    trained = new_parameters(ext)
    assert len(trained) > 0
    assert all(p.grad is not None for p in trained)
    changed = [
        not torch.equal(m.weight_new, _initial_new(scenario, name))
        for name, m in ext.named_modules()
        if isinstance(m, CovariateWeight) and m.weight_new is not None
    ]
    assert all(changed)


def _initial_new(scenario: Scenario, name: str) -> torch.Tensor:
    """The new columns as surgery initialised them (surgery is deterministic in its seed)."""
    fresh = grow(scenario.reference, scenario.n_new, seed=0)
    return dict(fresh.named_modules())[name].weight_new.detach()  # type: ignore[union-attr]


def test_new_columns_follow_each_covariate_block(scenario: Scenario) -> None:
    ref_state = scenario.reference.state_dict()
    ext_state = scenario.extension.state_dict()
    assert ref_state.keys() == ext_state.keys()
    ref_sizes = scenario.reference.config.covariate_sizes
    for cov, weight in covariate_weights(scenario.extension):
        assert weight.n_categories == ref_sizes[cov] + scenario.n_new[cov]
    for key, value in ref_state.items():
        grown = ext_state[key]
        if grown.shape == value.shape:
            assert torch.equal(grown, value), key
        else:
            # Known categories keep their column index; new columns come right after.
            k = value.shape[1]
            assert torch.equal(grown[:, :k], value), key
            assert grown.shape[0] == value.shape[0]


def test_extension_loads_as_an_ordinary_model(scenario: Scenario) -> None:
    fresh = CVAE(scenario.extension.config)
    fresh.load_weights(scenario.extension.state_dict())
    assert all(m.weight_new is None for m in fresh.modules() if isinstance(m, CovariateWeight))
    x = scenario.ref_counts.dense_rows(np.arange(10))
    codes = torch.as_tensor(scenario.ref_codes[:10])
    assert torch.equal(fresh.embed(x, codes), scenario.extension.embed(x, codes))


def test_all_injection_two_layers_gains_exactly_l_columns_per_layer() -> None:
    cfg = ModelConfig(n_genes=N_GENES, covariate_sizes=(3, 2), n_layers=2, n_hidden=16)
    ref = build_model(cfg)
    ref.trained.fill_(True)
    ext = grow(ref, (4, 1))
    for mlp in (ext.encoder.mlp, ext.decoder.mlp):
        assert len(mlp.blocks) == 2
        for block in mlp.blocks:
            assert [w.n_added for w in block.linear.covariates] == [4, 1]
            assert [w.n_categories for w in block.linear.covariates] == [7, 3]
    assert ext.config.covariate_sizes == (7, 3)


def test_surgery_leaves_its_input_untouched() -> None:
    ref = build_model(ModelConfig(n_genes=N_GENES, covariate_sizes=(2,)))
    ref.trained.fill_(True)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    ext = grow(ref, (3,))
    assert ref.config.covariate_sizes == (2,)
    assert all(m.weight_new is None for m in ref.modules() if isinstance(m, CovariateWeight))
    assert all(p.requires_grad for p in ref.parameters())
    for key, value in ref.state_dict().items():
        assert torch.equal(value, state[key])
    assert ext is not ref


def test_no_new_categories_gives_an_unchanged_copy() -> None:
    ref = build_model(ModelConfig(n_genes=N_GENES, covariate_sizes=(2,)))
    ref.trained.fill_(True)
    ext = grow(ref, (0,))
    assert new_parameters(ext) == []
    for key, value in ref.state_dict().items():
        assert torch.equal(ext.state_dict()[key], value)
    history = train_query(ext, _counts(10, 0), np.zeros((10, 1), dtype=np.int64))
    assert history.epochs == []


def test_gene_batch_dispersion_grows_from_the_reference_mean() -> None:
    cfg = ModelConfig(n_genes=N_GENES, covariate_sizes=(3,), dispersion="gene-batch")
    ref = build_model(cfg)
    ref.trained.fill_(True)
    ext = grow(ref, (2,))
    disp = ext.dispersion
    assert isinstance(disp, CovariateWeight)
    assert disp.n_categories == 5
    expected = ref.dispersion.weight.mean(dim=1)  # type: ignore[union-attr]
    assert torch.allclose(disp.weight_new[:, 0], expected)  # type: ignore[index]


def test_plan_surgery_compares_as_strings_and_skips_known() -> None:
    plan = plan_surgery(
        [("batch", ["1", "2"]), ("donor", ["a"])],
        {"batch": [2, 3, "3", 4], "donor": ["a"]},
    )
    assert plan.categories == (("1", "2", "3", "4"), ("a",))
    assert plan.n_new == (2, 0)
    assert plan.added_by_key() == {"batch": ["3", "4"]}
    assert plan_surgery([("batch", ["1"])], {"batch": ["1"]}).is_noop


def test_unknown_covariate_is_a_surgery_error() -> None:
    with pytest.raises(SurgeryError, match="unknown covariates"):
        plan_surgery([("batch", ["a"])], {"donor": ["x"]})


def test_untrained_model_is_refused() -> None:
    ref = build_model(ModelConfig(n_genes=N_GENES, covariate_sizes=(2,)))
    with pytest.raises(SurgeryError, match="trained"):
        grow(ref, (1,))


def test_wrong_number_of_counts_is_refused() -> None:
    ref = build_model(ModelConfig(n_genes=N_GENES, covariate_sizes=(2,)))
    ref.trained.fill_(True)
    with pytest.raises(SurgeryError, match="each of the 1 covariates"):
        grow(ref, (1, 1))
    with pytest.raises(SurgeryError, match="≥ 0"):
        grow(ref, (-1,))


@pytest.mark.parametrize(
    "hand_written",
    [
        pytest.param(True, marks=pytest.mark.skipif(not _C_STEP, reason="C extension not built")),
        False,
    ],
)
def test_query_dropout_is_off_by_default_and_optional(
    hand_written: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both step implementations: the C one (fastnet) and autograd through the modules."""
    from hubarches import train as train_module

    cfg = ModelConfig(n_genes=N_GENES, covariate_sizes=(2,), dropout=0.5, n_hidden=8)
    ref = build_model(cfg)
    ref.trained.fill_(True)
    seen: list[bool] = []
    if hand_written:
        draw = fastnet.QueryStep._dropout_seeds

        def spy(self: fastnet.QueryStep, blocks: list) -> list:
            seeds = draw(self, blocks)
            seen.extend(s is not None for s in seeds)
            return seeds

        monkeypatch.setattr(fastnet.QueryStep, "_dropout_seeds", spy)
    else:
        monkeypatch.setattr(train_module, "query_step", lambda *a, **k: None)
    assert TrainOptions().dropout_in_query is False
    for dropout_in_query in (False, True):
        ext = grow(ref, (1,))
        seen.clear()
        hooks = [
            m.register_forward_hook(lambda mod, _i, _o: seen.append(mod.training))
            for m in ext.modules()
            if isinstance(m, torch.nn.Dropout) and not hand_written
        ]
        train_query(
            ext,
            _counts(16, 0),
            np.full((16, 1), 2),
            options=TrainOptions(epochs=1, batch_size=8, dropout_in_query=dropout_in_query),
        )
        for h in hooks:
            h.remove()
        assert seen
        assert all(s == dropout_in_query for s in seen)
