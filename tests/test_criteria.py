"""analysis.criteria against a brute-force reference, plus the criteria's edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from analysis import AnalysisConfig
from common.config import build
from common.errors import ConfigError
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from analysis.criteria import Criteria, feature_stats, outlier_features
from tests.synthetic import (
    SITES,
    full_mask,
    plant,
    random_activations,
    reference_outliers,
    reference_per_dim,
    scan_tables,
)

EXACT_KEYS = ["layers", "occurrences", "layer_fraction", "site_fraction", "token_fraction"]
EXACT_KEYS += ["position_fraction"]


def analysed(acts, mask, criteria):
    """feature_stats and outlier_features of `# [layers, sites, seqs, seq_len, hidden]`."""
    exceedances, stats = scan_tables(acts, mask, criteria.threshold)
    num_layers, _, _, seq_len, _ = acts.shape
    per_dim = feature_stats(exceedances, stats.drop("count"), num_layers, int(mask.sum()), seq_len)
    return per_dim, outlier_features(per_dim, criteria)


def assert_matches_reference(per_dim, reference):
    assert per_dim["dim"].to_list() == sorted(reference)
    for row in per_dim.iter_rows(named=True):
        expected = reference[row["dim"]]
        assert row["max_abs"] == pytest.approx(expected["max_abs"])
        for key in EXACT_KEYS:
            assert row[key] == expected[key], (row["dim"], key)


def found(features):
    return dict(zip(features["dim"].to_list(), features["classification"].to_list(), strict=True))


@pytest.mark.parametrize("threshold", [3.0, 6.0, 10.0])
def test_feature_stats_match_brute_force_on_random_sparse_activations(threshold):
    rng = np.random.default_rng(7)
    acts = random_activations(rng, 5, num_seqs=4, seq_len=6, hidden=12, spike_density=0.03)
    plant(acts, dim=4, layers=range(5), token_share=0.7, rng=rng)
    mask = full_mask(acts)
    mask[1, 4:] = mask[3, 2:] = False  # padding: those tokens are not captured
    criteria = Criteria(threshold=threshold)
    per_dim, features = analysed(acts, mask, criteria)
    reference = reference_per_dim(acts, mask, threshold)
    assert_matches_reference(per_dim, reference)
    assert found(features) == reference_outliers(reference, criteria)
    if threshold <= 10:
        assert found(features)[4] == "systematic"


ENTRY = st.sampled_from([0.0, 0.5, -2.0, 5.99, 6.0, -6.0, 6.01, 8.5, -40.0])


@st.composite
def runs(draw):
    layers, seqs, seq_len, hidden = (draw(st.integers(1, n)) for n in (4, 3, 4, 4))
    shape = (layers, len(SITES), seqs, seq_len, hidden)
    acts = draw(arrays(np.float32, shape, elements=ENTRY))
    mask = draw(arrays(np.bool_, shape[2:4]))
    mask[0, 0] = True  # a run captures at least one token
    criteria = Criteria(
        threshold=draw(st.sampled_from([5.99, 6.0, 6.01])),
        min_layer_fraction=draw(st.sampled_from([0.0, 0.25, 0.5, 1.0])),
        min_token_fraction=draw(st.sampled_from([0.0, 0.06, 0.3, 1.0])),
        layer_unit=draw(st.sampled_from(["layer", "site"])),
        systematic_layer_fraction=draw(st.sampled_from([0.5, 0.75])),
        systematic_token_fraction=draw(st.sampled_from([0.25, 0.5])),
    )
    return acts, mask, criteria


@settings(max_examples=60, deadline=None)
@given(runs())
def test_criteria_match_brute_force_for_any_run(run):
    acts, mask, criteria = run
    per_dim, features = analysed(acts, mask, criteria)
    reference = reference_per_dim(acts, mask, criteria.threshold)
    assert_matches_reference(per_dim, reference)
    assert found(features) == reference_outliers(reference, criteria)


def one_dim_run(values_by_layer, num_layers=4, tokens=10):
    """acts with a single dim: `values_by_layer[layer]` at ln_attn of token 0, zero elsewhere."""
    acts = np.zeros((num_layers, len(SITES), 1, tokens, 1), dtype=np.float32)
    for layer, value in values_by_layer.items():
        acts[layer, 0, 0, 0, 0] = value
    return acts


def test_threshold_is_inclusive_for_both_signs():
    acts = one_dim_run({0: 6.0, 1: -6.0, 2: np.nextafter(np.float32(6.0), np.float32(0))})
    per_dim, features = analysed(acts, full_mask(acts), Criteria(min_token_fraction=0.1))
    assert per_dim.row(0, named=True)["layers"] == [0, 1]
    assert per_dim["occurrences"].to_list() == [2]
    assert found(features) == {0: "probabilistic"}


def test_fraction_boundaries_are_inclusive():
    # 1 of 4 layers = 0.25 and 1 token of 10 = 0.1: exactly the minima asked for.
    acts = one_dim_run({3: 7.0})
    at_bars = Criteria(min_layer_fraction=0.25, min_token_fraction=0.1)
    _, features = analysed(acts, full_mask(acts), at_bars)
    assert found(features) == {0: "probabilistic"}
    for above in ({"min_layer_fraction": 0.26}, {"min_token_fraction": 0.11}):
        _, features = analysed(acts, full_mask(acts), Criteria(**{**at_bars.as_dict(), **above}))
        assert found(features) == {}


def test_layer_unit_site_counts_layer_sites():
    # One site in each of 2 of 4 layers: layer_fraction 0.5, site_fraction 2/8 = 0.25.
    acts = one_dim_run({0: 9.0, 1: 9.0})
    criteria = Criteria(min_layer_fraction=0.5, min_token_fraction=0.1)
    per_dim, features = analysed(acts, full_mask(acts), criteria)
    assert per_dim.select("layer_fraction", "site_fraction").row(0) == (0.5, 0.25)
    assert found(features) == {0: "probabilistic"}
    by_site = Criteria(min_layer_fraction=0.5, min_token_fraction=0.1, layer_unit="site")
    _, features = analysed(acts, full_mask(acts), by_site)
    assert found(features) == {}


def test_systematic_needs_both_layer_and_token_share():
    # [layers, sites, seqs, seq_len, hidden]
    acts = np.zeros((4, len(SITES), 2, 5, 3), dtype=np.float32)
    plant(acts, dim=0, layers=range(4), token_share=0.5)  # everywhere, half the tokens
    plant(acts, dim=1, layers=range(4), token_share=0.3)  # everywhere, too few tokens
    plant(acts, dim=2, layers=range(2), token_share=0.9)  # many tokens, too few layers
    _, features = analysed(acts, full_mask(acts), Criteria())
    assert found(features) == {0: "systematic", 1: "probabilistic", 2: "probabilistic"}


def test_position_fraction_pools_sequences():
    acts = np.zeros((1, len(SITES), 2, 4, 1), dtype=np.float32)
    acts[0, 0, 0, 1, 0] = acts[0, 1, 1, 1, 0] = acts[0, 0, 1, 3, 0] = 8.0  # positions 1, 1, 3
    per_dim, _ = analysed(acts, full_mask(acts), Criteria())
    row = per_dim.select("position_fraction", "token_fraction", "occurrences").row(0)
    assert row == (0.5, 3 / 8, 3)


def test_nothing_found_gives_empty_table_with_all_columns():
    acts = np.full((2, len(SITES), 1, 3, 4), 5.0, dtype=np.float32)
    per_dim, features = analysed(acts, full_mask(acts), Criteria())
    assert per_dim["max_abs"].to_list() == [5.0] * 4
    assert per_dim["occurrences"].to_list() == [0] * 4
    assert per_dim["layers"].to_list() == [[]] * 4
    assert features.is_empty()
    assert "classification" in features.columns


@pytest.mark.parametrize(
    "settings_, message",
    [
        ({"layer_unit": "foo"}, r"analysis.layer_unit='foo': choose one of \['layer', 'site'\]"),
        ({"min_layer_fraction": 1.5}, r"analysis.min_layer_fraction=1.5: choose a fraction in"),
        ({"min_token_fraction": -0.1}, r"analysis.min_token_fraction=-0.1"),
        ({"systematic_token_fraction": "high"}, r"analysis.systematic_token_fraction='high'"),
        ({"threshold": 0}, r"analysis.threshold=0.0: choose a finite number > 0"),
        ({"threshold": float("nan")}, r"analysis.threshold=nan"),
        ({"threshold": True}, r"analysis.threshold=True"),
        ({"thershold": 6}, r"unknown key\(s\) \['thershold'\] in analysis; valid keys: \[.*'threshold'"),
    ],
)
def test_invalid_settings_name_key_value_and_choices(settings_, message):
    with pytest.raises(ConfigError, match=message):
        build(AnalysisConfig, settings_, "analysis")


def test_the_analysis_section_holds_the_criteria_and_how_many_actors_apply_them():
    assert build(AnalysisConfig, {}, "analysis").criteria() == Criteria()
    section = build(AnalysisConfig, {"threshold": 4, "layer_unit": "site", "num_actors": 8}, "analysis")
    assert section.criteria() == Criteria(threshold=4, layer_unit="site") and section.num_actors == 8
    assert section.criteria().layer_column == "site_fraction"
