from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from hubarches import labels, neighbors
from hubarches.errors import DataError, HubarchesWarning, ModelError

N_DIMS = 10
CATS = ("A", "B", "C", "D")
SD = 0.3  # blob spread: tight next to the distance 10 between blob centres


def _centres() -> np.ndarray:
    """Four reference types at ±10 on the first two axes; the origin is equidistant."""
    c = np.zeros((4, N_DIMS))
    c[0, 0], c[1, 1], c[2, 0], c[3, 1] = 10.0, 10.0, -10.0, -10.0
    return c


def _blobs(centres: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([c + rng.normal(0.0, SD, (n, N_DIMS)) for c in centres])
    return x.astype(np.float32), np.repeat(np.arange(len(centres)), n)


@pytest.fixture(scope="module")
def world() -> dict:
    rng = np.random.default_rng(7)
    ref, codes = _blobs(_centres(), 250, rng)
    known, known_codes = _blobs(_centres(), 100, rng)
    far = np.zeros(N_DIMS)
    far[2] = 10.0  # a fifth type in a direction no reference type lies in
    unseen, _ = _blobs(far[None, :], 150, rng)
    return {
        "ref": ref,
        "codes": codes,
        "index": labels.build_index(ref),
        "known": known,
        "known_codes": known_codes,
        "unseen": unseen,
    }


# --- the neighbour index ------------------------------------------------------------------


@pytest.mark.parametrize("order_from", [1, 10**9], ids=["spatially-ordered", "as-given"])
def test_query_is_exact_and_typed(world, monkeypatch, order_from):
    monkeypatch.setattr(neighbors, "_ORDER_MIN_QUERY", order_from)
    q = np.concatenate([world["known"][::37], world["unseen"][::11]])
    dist, idx = world["index"].query(q, 5)
    assert dist.dtype == np.float32
    assert idx.dtype == np.int64
    assert dist.shape == idx.shape == (q.shape[0], 5)
    brute = np.linalg.norm(q[:, None, :] - world["ref"][None, :, :], axis=2)
    np.testing.assert_array_equal(idx, np.argsort(brute, axis=1, kind="stable")[:, :5])
    np.testing.assert_allclose(dist, np.sort(brute, axis=1)[:, :5], rtol=1e-5)


def test_query_k1_and_empty_query(world):
    dist, idx = world["index"].query(world["known"][:3], 1)
    assert dist.shape == idx.shape == (3, 1)
    dist, idx = world["index"].query(np.zeros((0, N_DIMS)), 4)
    assert dist.shape == idx.shape == (0, 4)
    t, m = labels.annotate(world["index"], world["codes"], CATS, np.zeros((0, N_DIMS)))
    assert t.labels.shape == m.score.shape == (0,)
    assert json.dumps(t.to_dict())
    assert json.dumps(m.to_dict())


# --- transfer on simulated types with one held out --------------------------------------


def test_known_types_transfer_accurately(world):
    t = labels.transfer_labels(world["index"], world["codes"], CATS, world["known"])
    assert t.k == labels.DEFAULT_K
    assert t.threshold == labels.DEFAULT_UNCERTAINTY_THRESHOLD
    # Tight, separated blobs: every known cell gets its own type, with certainty.
    assert (t.labels == np.array(CATS, dtype=object)[world["known_codes"]]).mean() >= 0.99
    assert t.n_unknown == 0
    assert t.probability.dtype == t.uncertainty.dtype == np.float32
    np.testing.assert_allclose(t.uncertainty, 1.0 - t.probability, atol=1e-6)
    assert (t.probability > 0.99).mean() >= 0.99
    m = labels.mapping_quality(world["index"], world["known"])
    # Cells of seen types map fine, but for a Gaussian's tail: its cells are farther from
    # their (more central) neighbours than those from theirs. Measured here: 93.75 % ok,
    # median score 1.07, P95 1.32.
    assert m.ok.mean() >= 0.9
    assert 0.9 <= np.median(m.score) <= 1.2


def test_unseen_type_is_flagged_and_called_unknown(world):
    m = labels.mapping_quality(world["index"], world["unseen"])
    assert m.ok.dtype == bool
    assert (~m.ok).mean() >= 0.95
    assert m.n_flagged == int((~m.ok).sum())
    assert m.score.min() > m.threshold
    t, m2 = labels.annotate(world["index"], world["codes"], CATS, world["unseen"])
    np.testing.assert_array_equal(m2.score, m.score)
    assert (t.labels == labels.UNKNOWN_LABEL).mean() >= 0.95
    assert (t.codes[t.labels == labels.UNKNOWN_LABEL] == -1).all()
    assert t.n_flagged_unknown > 0


def test_vote_alone_is_blind_to_an_unseen_type(world):
    """Why annotate() also uses mapping quality: the kNN vote is often confident there."""
    t = labels.transfer_labels(world["index"], world["codes"], CATS, world["unseen"])
    assert (t.labels != labels.UNKNOWN_LABEL).mean() > 0.5
    t2, _ = labels.annotate(
        world["index"], world["codes"], CATS, world["unseen"], unknown_if_flagged=False
    )
    np.testing.assert_array_equal(t2.labels, t.labels)


def test_annotate_mixes_known_and_unseen(world):
    q = np.concatenate([world["known"], world["unseen"]])
    truth = np.concatenate([world["known_codes"], np.full(len(world["unseen"]), -1)])
    t, m = labels.annotate(world["index"], world["codes"], CATS, q)
    assert (t.codes == truth).mean() >= 0.93  # measured 0.955: tails of known types flagged
    assert (t.codes[t.codes >= 0] == truth[t.codes >= 0]).all()  # no label is wrong
    assert (m.ok == (truth >= 0)).mean() >= 0.93
    # One query, two consumers: the same as the separate calls.
    t_alone = labels.transfer_labels(world["index"], world["codes"], CATS, q)
    np.testing.assert_array_equal(t.probability, t_alone.probability)
    np.testing.assert_array_equal(m.score, labels.mapping_quality(world["index"], q).score)


def test_ambiguous_neighbourhood_is_unknown_by_uncertainty():
    rng = np.random.default_rng(3)
    ref = rng.normal(0.0, SD, (600, N_DIMS))
    codes = np.arange(600) % 3  # three labels interleaved in one population
    q = rng.normal(0.0, SD, (200, N_DIMS))
    t = labels.transfer_labels(labels.build_index(ref), codes, ("x", "y", "z"), q)
    assert (t.labels == labels.UNKNOWN_LABEL).mean() >= 0.8
    assert (t.uncertainty[t.labels == labels.UNKNOWN_LABEL] > t.threshold).all()
    lenient = labels.transfer_labels(
        labels.build_index(ref), codes, ("x", "y", "z"), q, threshold=1.0
    )
    assert lenient.n_unknown == 0


def test_to_dict_is_json_ready(world):
    q = np.concatenate([world["known"], world["unseen"]])
    t, m = labels.annotate(world["index"], world["codes"], CATS, q)
    td = json.loads(json.dumps(t.to_dict()))
    assert td["counts"][labels.UNKNOWN_LABEL] == t.n_unknown
    assert list(td["counts"]) == [*CATS, labels.UNKNOWN_LABEL]
    assert sum(td["counts"].values()) == len(q)
    assert td["k"] == labels.DEFAULT_K
    md = json.loads(json.dumps(m.to_dict()))
    assert md["n_flagged"] == m.n_flagged
    assert md["n_degenerate"] == 0
    assert "local distance ratio" in md["score"]
    assert md["score_quantiles"]["q50"] == pytest.approx(float(np.median(m.score)))
    assert 0.0 < md["fraction_flagged"] < 1.0


# --- the weights ---------------------------------------------------------------------------


def test_weights_follow_scarches_formula():
    rng = np.random.default_rng(0)
    d = np.sort(rng.uniform(0.5, 4.0, (50, 15)), axis=1)
    sd = d.std(axis=1, keepdims=True)
    expected = np.exp(-d / (2.0 / sd) ** 2)
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(labels._kernel_weights(d), expected, rtol=1e-12)


def test_identical_distances_give_equal_weights_and_a_lowest_code_tie():
    ref = np.ones((4, 3))  # four coinciding reference cells
    index = labels.build_index(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no 0/0 RuntimeWarning
        t = labels.transfer_labels(index, np.array([1, 0, 1, 0]), ("a", "b"), np.ones((2, 3)), k=4)
    np.testing.assert_allclose(t.probability, 0.5)
    assert list(t.labels) == ["a", "a"]  # 0.5 is not above the threshold; the tie goes to "a"
    t = labels.transfer_labels(index, np.array([1, 1, 1, 0]), ("a", "b"), np.full((1, 3), 5.0), k=4)
    assert t.labels[0] == "b"
    assert t.probability[0] == pytest.approx(0.75)


def test_coinciding_reference_scores_zero_or_inf():
    index = labels.build_index(np.ones((5, 2)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no 0/0
        with pytest.warns(HubarchesWarning, match="2 query cells have only coinciding"):
            m = labels.mapping_quality(index, np.array([[1.0, 1.0], [1.0, 2.0]]), k=3)
    assert m.n_degenerate == 2
    assert list(m.ok) == [True, False]
    assert m.score[0] == 0.0
    assert np.isinf(m.score[1])
    assert json.loads(json.dumps(m.to_dict()))["n_degenerate"] == 2


def test_leave_self_out_with_duplicate_reference_cells():
    # Pairs of identical cells on a line: a cell's nearest *other* cell is its twin (distance
    # 0), the next the neighbouring pair (√2). Only the cell itself may be left out.
    base = np.arange(10.0)[:, None] * np.ones((1, 2))
    index = labels.build_index(np.repeat(base, 2, axis=0))
    m = labels.mapping_quality(index, base + 0.5, k=2)
    # Both neighbours at √2/2; each neighbour's own spread (0 + √2)/2: a ratio of exactly 1.
    np.testing.assert_allclose(m.score, 1.0, rtol=1e-6)
    np.testing.assert_allclose(index._spread[2], np.sqrt(2) / 2, rtol=1e-6)
    assert m.n_degenerate == 0
    # k=1: each cell's nearest other cell is its twin, so every spread is 0.
    with pytest.warns(HubarchesWarning, match="coinciding"):
        m = labels.mapping_quality(index, base, k=1)
    assert m.ok.all()
    assert (m.score == 0.0).all()
    with pytest.warns(HubarchesWarning, match="coinciding"):
        m = labels.mapping_quality(index, base + 0.5, k=1)
    assert not m.ok.any()


def test_score_matches_its_formula():
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(200, 3)) * np.array([1.0, 0.3, 2.0])
    q = rng.normal(size=(50, 3)) * 1.5
    k = 5
    m = labels.mapping_quality(labels.build_index(ref), q, k=k)
    d_qr = np.linalg.norm(q[:, None] - ref[None], axis=2)
    d_rr = np.linalg.norm(ref[:, None] - ref[None], axis=2)
    np.fill_diagonal(d_rr, np.inf)
    spread = np.sort(d_rr, axis=1)[:, :k].mean(axis=1)
    nn = np.argsort(d_qr, axis=1)[:, :k]
    expected = np.take_along_axis(d_qr, nn, axis=1).mean(axis=1) / spread[nn].mean(axis=1)
    np.testing.assert_allclose(m.score, expected, rtol=1e-5)
    assert m.k == k
    np.testing.assert_array_equal(m.ok, m.score <= labels.MAPPING_QUALITY_THRESHOLD)


def test_unseen_type_just_off_a_dense_cluster_is_flagged():
    """The case a global distance scale misses: the VAE puts unseen cells beside a known type.

    Next to a tight type A, an unseen tight type U lies closer to its reference neighbours
    than cells of a loose known type B lie to theirs; only the local ratio tells them apart.
    """
    rng = np.random.default_rng(2)
    a = rng.normal(0.0, 0.1, (300, N_DIMS))
    b = rng.normal(0.0, 1.0, (300, N_DIMS)) + 20.0 * np.eye(N_DIMS)[0]
    index = labels.build_index(np.concatenate([a, b]))
    u = rng.normal(0.0, 0.1, (100, N_DIMS)) + 1.0 * np.eye(N_DIMS)[1]
    b_query = rng.normal(0.0, 1.0, (100, N_DIMS)) + 20.0 * np.eye(N_DIMS)[0]
    d_u, _ = index.query(u, labels.DEFAULT_K)
    d_b, _ = index.query(b_query, labels.DEFAULT_K)
    assert np.median(d_u.mean(axis=1)) < 0.5 * np.median(d_b.mean(axis=1))
    assert (~labels.mapping_quality(index, u).ok).mean() >= 0.95
    assert labels.mapping_quality(index, b_query).ok.mean() >= 0.9


def test_spread_is_computed_for_needed_cells_once_and_cached(world, monkeypatch):
    index = labels.build_index(world["ref"])
    near_a = world["known"][world["known_codes"] == 0]
    _, idx = index.query(near_a, labels.DEFAULT_K)
    first = labels.mapping_quality(index, near_a)
    cache = index._spread[labels.DEFAULT_K]
    computed = np.flatnonzero(~np.isnan(cache))
    np.testing.assert_array_equal(computed, np.unique(idx))  # only A's neighbours
    searched: list[int] = []
    search = neighbors._search

    def counting(tree, x, k, **kw):
        searched.append(x.shape[0])
        return search(tree, x, k, **kw)

    monkeypatch.setattr(neighbors, "_search", counting)
    again = labels.mapping_quality(index, near_a)
    assert searched == [len(near_a)]  # the query only: every spread came from the cache
    np.testing.assert_array_equal(again.score, first.score)
    _, idx_all = index.query(world["known"], labels.DEFAULT_K)
    searched.clear()
    labels.mapping_quality(index, world["known"])
    now = np.flatnonzero(~np.isnan(cache))
    np.testing.assert_array_equal(now, np.unique(idx_all))
    assert searched == [len(world["known"]), len(now) - len(computed)]  # only the new ones
    fresh = labels.mapping_quality(labels.build_index(world["ref"]), world["known"])
    np.testing.assert_array_equal(labels.mapping_quality(index, world["known"]).score, fresh.score)


# --- edge cases ----------------------------------------------------------------------------


def test_k_larger_than_reference_is_clipped_with_a_warning():
    ref = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    index = labels.build_index(ref)
    with pytest.warns(HubarchesWarning, match="exceeds the 3 reference cells"):
        t = labels.transfer_labels(index, np.array([0, 0, 1]), ("a", "b"), np.zeros((2, 2)), k=50)
    assert t.k == 3
    assert list(t.labels) == ["a", "a"]
    with pytest.warns(HubarchesWarning):
        m = labels.mapping_quality(index, np.zeros((2, 2)), k=50)
    assert m.k == 2  # the reference side leaves itself out
    with pytest.warns(HubarchesWarning):
        _, m2 = labels.annotate(index, np.array([0, 0, 1]), ("a", "b"), np.zeros((2, 2)), k=50)
    np.testing.assert_array_equal(m2.score, m.score)


def test_reference_with_one_label(world):
    one = np.zeros_like(world["codes"])
    t = labels.transfer_labels(world["index"], one, ("only",), world["known"])
    assert set(t.labels) == {"only"}
    np.testing.assert_allclose(t.probability, 1.0, rtol=1e-6)
    np.testing.assert_allclose(t.uncertainty, 0.0, atol=1e-6)


def test_single_cell_reference():
    index = labels.build_index(np.zeros((1, 3)))
    with pytest.warns(HubarchesWarning):
        t = labels.transfer_labels(index, np.array([0]), ("a",), np.ones((2, 3)))
    assert list(t.labels) == ["a", "a"]
    with pytest.warns(HubarchesWarning), pytest.raises(DataError, match="at least 2 cells"):
        labels.mapping_quality(index, np.ones((2, 3)))


def test_missing_labels_abstain_but_keep_their_weight():
    ref = np.zeros((15, 2))  # coinciding: equal weights, so shares are exact fractions
    codes = np.array([0] * 10 + [-1] * 5)
    t = labels.transfer_labels(labels.build_index(ref), codes, ("a", "b"), np.zeros((1, 2)))
    assert t.labels[0] == "a"
    assert t.probability[0] == pytest.approx(10 / 15)
    codes = np.array([0] * 5 + [1] * 2 + [-1] * 8)  # mostly unannotated → Unknown
    t = labels.transfer_labels(labels.build_index(ref), codes, ("a", "b"), np.zeros((1, 2)))
    assert t.labels[0] == labels.UNKNOWN_LABEL
    assert t.probability[0] == pytest.approx(5 / 15)


def test_cells_without_labelled_neighbours_are_unknown_at_any_threshold():
    ref = np.array([[0.0], [0.1], [10.0], [10.1]])
    codes = np.array([-1, -1, 0, 0])
    q = np.array([[0.0], [10.0]])
    t = labels.transfer_labels(labels.build_index(ref), codes, ("a",), q, k=2, threshold=1.0)
    assert list(t.labels) == [labels.UNKNOWN_LABEL, "a"]
    assert t.probability[0] == 0.0
    assert list(t.codes) == [-1, 0]


def test_all_missing_labels_refused():
    with pytest.raises(DataError, match="no reference cell has a label"):
        labels.transfer_labels(
            labels.build_index(np.zeros((3, 2))), np.full(3, -1), ("a",), np.zeros((1, 2)), k=3
        )


def test_category_named_unknown_warns(world):
    with pytest.warns(HubarchesWarning, match="Unknown"):
        labels.transfer_labels(
            world["index"], world["codes"], ("A", "B", "C", "Unknown"), world["known"]
        )


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_latents_are_a_model_error(world, bad):
    q = world["known"].copy()
    q[3, 4] = bad
    with pytest.raises(ModelError, match="non-finite") as err:
        labels.transfer_labels(world["index"], world["codes"], CATS, q)
    assert isinstance(err.value, ValueError)
    with pytest.raises(ModelError, match="1 of"):
        labels.mapping_quality(world["index"], q)
    with pytest.raises(ModelError, match="non-finite"):
        labels.build_index(q)


def test_shape_and_code_errors(world):
    index = world["index"]
    with pytest.raises(ModelError, match="dimensions"):
        index.query(np.zeros((2, N_DIMS + 1)), 3)
    with pytest.raises(ModelError, match="2-D"):
        labels.build_index(np.zeros(5))
    with pytest.raises(DataError, match="no cells"):
        labels.build_index(np.zeros((0, 3)))
    with pytest.raises(DataError, match="label codes for"):
        labels.transfer_labels(index, world["codes"][:-1], CATS, world["known"])
    with pytest.raises(DataError, match="out of range"):
        labels.transfer_labels(index, world["codes"], CATS[:3], world["known"])
    with pytest.raises(DataError, match="integer"):
        labels.transfer_labels(index, world["codes"].astype(float), CATS, world["known"])
    with pytest.raises(DataError, match="≥ −1"):
        labels.transfer_labels(index, world["codes"] - 2, CATS, world["known"])
    with pytest.raises(DataError, match="unique"):
        labels.transfer_labels(index, world["codes"], ("A", "A", "B", "C"), world["known"])


@pytest.mark.parametrize("k", [0, -3, 2.5, True])
def test_bad_k_refused(world, k):
    with pytest.raises(ModelError, match="k must be"):
        labels.transfer_labels(world["index"], world["codes"], CATS, world["known"], k=k)


def test_bad_thresholds_refused(world):
    with pytest.raises(ModelError, match="uncertainty threshold"):
        labels.transfer_labels(world["index"], world["codes"], CATS, world["known"], threshold=1.5)
    with pytest.raises(ModelError, match="mapping-quality threshold"):
        labels.mapping_quality(world["index"], world["known"], threshold=0.0)


def test_deterministic(world):
    q = np.concatenate([world["known"], world["unseen"]])
    a = labels.annotate(world["index"], world["codes"], CATS, q)
    b = labels.annotate(labels.build_index(world["ref"]), world["codes"], CATS, q)
    for x, y in zip(a, b, strict=True):
        for name in x.__dataclass_fields__:
            va, vb = getattr(x, name), getattr(y, name)
            if isinstance(va, np.ndarray):
                np.testing.assert_array_equal(va, vb)
            else:
                assert va == vb


def test_score_grows_with_distance(world):
    centre = _centres()[0]
    away = np.zeros(N_DIMS)
    away[5] = 1.0
    q = np.stack([centre + t * away for t in (0.0, 1.0, 2.0, 10.0)])
    m = labels.mapping_quality(world["index"], q)
    assert np.all(np.diff(m.score) > 0)
    assert list(m.ok) == [True, True, False, False]


# --- stratified subsampling ----------------------------------------------------------------


def test_subsample_keeps_everything_under_the_cap():
    np.testing.assert_array_equal(labels.stratified_subsample(np.array([0, 1, 1]), 3), [0, 1, 2])


def test_subsample_is_stratified_and_proportional():
    rng = np.random.default_rng(0)
    codes = np.concatenate([np.zeros(6000), np.ones(3000), np.full(990, 2), [3], np.full(9, -1)])
    codes = rng.permutation(codes.astype(np.int64))
    idx = labels.stratified_subsample(codes, 1000, seed=0)
    assert idx.dtype == np.int64
    assert len(idx) == 1000
    assert np.all(np.diff(idx) > 0)  # sorted, unique
    counts = {int(c): int((codes[idx] == c).sum()) for c in (-1, 0, 1, 2, 3)}
    assert counts[3] == 1  # a singleton label keeps its cell
    assert counts[-1] >= 1  # unlabelled cells are a stratum of their own
    for c, n in ((0, 6000), (1, 3000), (2, 990)):
        assert abs(counts[c] - 1000 * n / len(codes)) <= 2


def test_subsample_deterministic_in_seed():
    codes = np.arange(5000) % 7
    a = labels.stratified_subsample(codes, 500, seed=3)
    np.testing.assert_array_equal(a, labels.stratified_subsample(codes, 500, seed=3))
    assert not np.array_equal(a, labels.stratified_subsample(codes, 500, seed=4))


def test_subsample_refuses_a_cap_below_the_labels():
    with pytest.raises(ModelError, match="number of labels"):
        labels.stratified_subsample(np.arange(10), 5)
    with pytest.raises(ModelError, match="cap must be"):
        labels.stratified_subsample(np.arange(10), 0)
    with pytest.raises(DataError):
        labels.stratified_subsample(np.array([0.5, 1.0]), 1)


def test_warnings_point_at_the_caller():
    index = labels.build_index(np.zeros((3, 2)))
    for call in (
        lambda: labels.transfer_labels(index, np.zeros(3, int), ("a",), np.zeros((1, 2)), k=9),
        lambda: labels.mapping_quality(index, np.ones((1, 2)), k=9),
        lambda: labels.annotate(index, np.zeros(3, int), ("a",), np.zeros((1, 2)), k=9),
    ):
        with pytest.warns(HubarchesWarning) as record:
            call()
        assert {w.filename for w in record} == {__file__}


def test_transfer_from_neighbors_checks_its_inputs():
    codes = np.array([0, 1])
    d, i = np.zeros((1, 2)), np.array([[0, 1]])
    with pytest.raises(ModelError, match="integers"):
        labels.transfer_from_neighbors(d, i.astype(float), codes, ("a", "b"))
    with pytest.raises(DataError, match="outside"):
        labels.transfer_from_neighbors(d, i + 1, codes, ("a", "b"))
    with pytest.raises(ModelError, match="must both be"):
        labels.transfer_from_neighbors(d[:, :1], i, codes, ("a", "b"))
    with pytest.raises(ModelError, match="unknown_mask"):
        labels.transfer_from_neighbors(d, i, codes, ("a", "b"), unknown_mask=np.ones(2, bool))
    t = labels.transfer_from_neighbors(d, i, codes, ("a", "b"), unknown_mask=np.ones(1, bool))
    assert t.labels[0] == labels.UNKNOWN_LABEL
    assert t.n_flagged_unknown == 1
    assert t.probability[0] == pytest.approx(0.5)


def test_quality_from_neighbors_checks_its_inputs(world):
    index = world["index"]
    dist, idx = index.query(world["known"][:4], 3)
    m = labels.quality_from_neighbors(index, dist, idx)
    np.testing.assert_array_equal(
        m.score, labels.mapping_quality(index, world["known"][:4], k=3).score
    )
    with pytest.raises(ModelError, match="must both be"):
        labels.quality_from_neighbors(index, dist, idx[:, :2])
    with pytest.raises(ModelError, match="integers"):
        labels.quality_from_neighbors(index, dist, idx.astype(float))
    with pytest.raises(DataError, match="outside the 1000 reference cells"):
        labels.quality_from_neighbors(index, dist, idx + index.n_cells)
    with pytest.raises(ModelError, match="finite and non-negative"):
        labels.quality_from_neighbors(index, -dist, idx)
    with pytest.raises(ModelError, match="mapping-quality threshold"):
        labels.quality_from_neighbors(index, dist, idx, threshold=-1.0)
    strict = labels.quality_from_neighbors(index, dist, idx, threshold=1e-3)
    assert strict.n_flagged == 4


def test_approximate_search_is_close_and_deterministic(world):
    q = np.concatenate([world["known"], world["unseen"]])
    exact = labels.annotate(world["index"], world["codes"], CATS, q)
    index = labels.build_index(world["ref"], eps=0.5)
    assert index.eps == 0.5
    a = labels.annotate(index, world["codes"], CATS, q)
    b = labels.annotate(labels.build_index(world["ref"], eps=0.5), world["codes"], CATS, q)
    np.testing.assert_array_equal(a[0].labels, b[0].labels)
    np.testing.assert_array_equal(a[1].score, b[1].score)
    assert (a[0].labels == exact[0].labels).mean() >= 0.99
    assert (a[1].ok == exact[1].ok).mean() >= 0.99
    with pytest.raises(ModelError, match="eps"):
        labels.build_index(world["ref"], eps=-1.0)


def test_subsample_sizes_exact_on_random_label_mixes():
    rng = np.random.default_rng(11)
    for _ in range(200):
        n_labels = int(rng.integers(1, 40))
        sizes = rng.geometric(rng.uniform(0.001, 0.5), n_labels)
        codes = np.repeat(np.arange(n_labels) - 1, sizes)  # label −1 included
        cap = int(rng.integers(n_labels, sizes.sum() + 5))
        idx = labels.stratified_subsample(codes, cap, seed=int(rng.integers(1000)))
        assert len(idx) == min(cap, len(codes))
        assert len(np.unique(idx)) == len(idx)
        kept = np.bincount(codes[idx] + 1, minlength=n_labels)
        assert (kept >= 1).all()
        assert (kept <= sizes).all()
