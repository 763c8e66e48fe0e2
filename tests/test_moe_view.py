"""The MoE view: routing and expert captures, super experts, massive activations, attribution,
routing lift and bootstrap intervals, on a tiny MoE with a planted super expert.

Expert 2 of layer 1 writes dim 11 a million times too strongly: a super expert. Its
output is a massive activation of the residual stream from layer 1 on, which the layer
norms of later layers turn into an outlier feature at dim 11.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from actors.capture import CaptureConfig
from analysis import analyse
from analysis.bootstrap import bootstrap, resample_weights
from analysis.criteria import Criteria, feature_stats
from analysis.scan import read_kind
from cluster.plants import Plant
from common.layout import SITES, RunLayout
from common.storage import ROUTING
from tests.conftest import (in_process_run, read_site, reference_activations,
                            token_batch)
from tests.synthetic import full_mask, plant, random_activations, scan_tables

LAYER, EXPERT, DIM = 1, 2, 11
EVERYTHING = CaptureConfig(routing=True, experts=True, residual=True)


@pytest.fixture(scope="module")
def super_expert(tiny_checkpoint):
    return tiny_checkpoint(plants=(Plant(dim=DIM, layers=(LAYER,), scale=1e6, kind="expert", expert=EXPERT),))


@pytest.fixture(scope="module")
def tokens():
    return token_batch(seed=6, batch=4, seq=24, pad_last=5)


@pytest.mark.parametrize("num_stages", [1, 2, 3])
@pytest.mark.parametrize("mode", ["dense", "exceedances"])
def test_the_planted_super_expert_is_found_in_every_split_and_mode(super_expert, tokens, tmp_path, num_stages,
                                                                   mode):
    ids, mask = tokens
    in_process_run(super_expert, "float32", tmp_path, ids, mask, num_stages=num_stages, storage=mode,
                   capture=EVERYTHING)
    summary = analyse(str(tmp_path))
    assert [(s["layer"], s["expert"]) for s in summary["super_experts"]] == [(LAYER, EXPERT)]
    assert summary["super_experts"][0]["dim"] == DIM and summary["super_experts"][0]["max_abs"] > 100
    massive = summary["massive_activations"]
    assert [(m["dim"], m["first_layer"], m["last_layer"]) for m in massive] == [(DIM, LAYER, 5)]
    assert massive[0]["min_ratio_to_median"] >= 1000 and massive[0]["token_ids"]
    (feature,) = [f for f in summary["outlier_features"] if f["dim"] == DIM]
    assert (feature["experts"][0]["layer"], feature["experts"][0]["expert"]) == (LAYER, EXPERT)
    assert feature["stability"] == 1.0


def test_routing_is_the_routers_own_output(super_expert, tokens, tmp_path):
    from actors.checkpoint import load_full

    ids, mask = tokens
    in_process_run(super_expert, "float32", tmp_path, ids, mask, num_stages=3, capture=EVERYTHING)
    model = load_full(super_expert)
    chosen = {}
    for index, layer in enumerate(model.model.layers):
        # Qwen3-MoE's router returns (logits, top-k weights, top-k indices).
        layer.mlp.gate.register_forward_hook(lambda _m, _a, out, index=index: chosen.setdefault(index, []).append(out))
    with torch.inference_mode():
        for rows in (slice(0, 2), slice(2, 4)):
            model(input_ids=ids[rows], attention_mask=mask[rows])
    got = read_kind(RunLayout.of(str(tmp_path)), ROUTING).sort("layer", "seq", "pos", "rank")
    keep = mask.bool().reshape(-1).numpy()
    for index in range(6):
        weights = torch.cat([out[1] for out in chosen[index]]).numpy()[keep]  # [real tokens, k]
        experts = torch.cat([out[2] for out in chosen[index]]).numpy()[keep]
        layer = got.filter(layer=index)
        assert np.array_equal(layer["expert"].to_numpy(), experts.reshape(-1))
        assert np.array_equal(layer["weight"].to_numpy(), weights.reshape(-1))


def test_captures_change_no_stored_value(super_expert, tokens, tmp_path):
    ids, mask = tokens
    expected = reference_activations(super_expert, "float32", ids, mask, micro_batch=2)
    for name, capture in (("off", CaptureConfig()), ("on", EVERYTHING)):
        in_process_run(super_expert, "float32", tmp_path / name, ids, mask, num_stages=2, capture=capture)
    keep = mask.bool().numpy()
    for layer in range(6):
        for site in SITES:
            off, on = read_site(tmp_path / "off", layer, site), read_site(tmp_path / "on", layer, site)
            assert all(np.array_equal(a, b) for a, b in zip(off, on)), (layer, site)
            assert np.array_equal(on[2], expected[(layer, site)][keep])


def test_planted_dims_are_stable_and_decoys_are_not(planted_checkpoint, tmp_path):
    ids, mask = token_batch(seed=8, batch=8, seq=32)
    in_process_run(planted_checkpoint, "float32", tmp_path, ids, mask, num_stages=2)
    summary = analyse(str(tmp_path))
    assert {f["dim"]: f["stability"] for f in summary["outlier_features"]} == {5: 1.0, 40: 1.0}
    decoys = bootstrap(_exceedances(tmp_path), _sequences(ids), 6, Criteria(), [20, 9])
    assert decoys[20]["stability"] == 0.0 and decoys[9]["stability"] == 0.0


def _exceedances(run) -> pl.DataFrame:
    from analysis.scan import Scanner, list_partitions
    from common.record import read_record

    layout = RunLayout.of(str(run))
    record = read_record(layout)
    return Scanner(layout, record, 6.0).scan(list_partitions(layout, record)).exceedances


def _sequences(ids) -> pl.DataFrame:
    return pl.DataFrame({"seq": range(len(ids)), "tokens": [ids.shape[1]] * len(ids)})


@pytest.mark.parametrize("labels", [range(7), [12, 3, 40, 0, 7, 5, 9]], ids=["in-order", "scrambled"])
@pytest.mark.parametrize("layer_unit", ["layer", "site"])
def test_bootstrap_equals_resampling_by_hand(layer_unit, labels):
    # Sparse planted dims over 7 sequences of different lengths; one resample at a time, the
    # resampled sequences renamed and run through the criteria's own feature_stats. The run's
    # sequence ids need be neither contiguous nor in order: the i-th listed is the i-th drawn.
    rng = np.random.default_rng(4)
    acts = random_activations(rng, 4, num_seqs=7, seq_len=6, hidden=8, spike_density=0.01)
    plant(acts, 3, layers=[0, 1, 2], token_share=0.3, value=9.0, rng=rng)
    plant(acts, 5, layers=[3], token_share=0.1, value=-7.0, rng=rng)
    mask = full_mask(acts)
    mask[2, 4:] = mask[6, 1:] = False
    exceedances, _ = scan_tables(acts, mask, 6.0)
    labels = list(labels)
    exceedances = exceedances.with_columns(seq=pl.col("seq").replace_strict(dict(enumerate(labels))))
    criteria = Criteria(layer_unit=layer_unit, min_layer_fraction=0.5, min_token_fraction=0.1)
    sequences = pl.DataFrame({"seq": labels, "tokens": mask.sum(axis=1).tolist()})
    dims = sorted(exceedances["dim"].unique().to_list())
    fast = bootstrap(exceedances, sequences, 4, criteria, dims, resamples=200, seed=3)
    weights = resample_weights(7, 200, 3)
    shares = {dim: ([], []) for dim in dims}
    passed = {dim: 0 for dim in dims}
    for counts in weights:
        drawn = [s for s in range(7) for _ in range(counts[s])]
        renamed = pl.concat([exceedances.filter(pl.col("seq") == labels[s]).with_columns(seq=pl.lit(i, pl.Int64))
                             for i, s in enumerate(drawn)])
        tokens = int(sum(mask[s].sum() for s in drawn))
        empty = pl.DataFrame(schema={"layer": pl.Int32, "site": pl.String, "dim": pl.Int32, "max_abs": pl.Float64})
        per_dim = feature_stats(renamed, empty, 4, tokens, 6)
        for dim in dims:
            row = per_dim.filter(dim=dim).to_dicts()
            row = row[0] if row else {"layer_fraction": 0.0, "site_fraction": 0.0, "token_fraction": 0.0}
            shares[dim][0].append(row[criteria.layer_column])
            shares[dim][1].append(row["token_fraction"])
            passed[dim] += (row[criteria.layer_column] >= 0.5) and (row["token_fraction"] >= 0.1) \
                and row["token_fraction"] > 0
    for dim in dims:
        layer_share, token_share = (np.array(v) for v in shares[dim])
        assert fast[dim]["layer_fraction_ci"] == pytest.approx(list(np.quantile(layer_share, [0.025, 0.975])))
        assert fast[dim]["token_fraction_ci"] == pytest.approx(list(np.quantile(token_share, [0.025, 0.975])))
        assert fast[dim]["stability"] == passed[dim] / 200
    assert 0 < fast[3]["stability"] and fast[5]["stability"] < 1


def test_the_summary_keeps_only_what_was_captured(super_expert, tokens, tmp_path):
    ids, mask = tokens
    in_process_run(super_expert, "float32", tmp_path, ids, mask, num_stages=1,
                   capture=CaptureConfig(routing=True))
    summary = analyse(str(tmp_path))
    assert "super_experts" not in summary and "massive_activations" not in summary
    (feature,) = [f for f in summary["outlier_features"] if f["dim"] == DIM]
    assert feature["routing_lift"] and "experts" not in feature
    best = feature["routing_lift"][0]
    assert best["lift"] > 1 and best["hits"] <= best["of"]


def test_reports_explain_and_compare_show_the_moe_view(super_expert, tokens, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from tests.pages import Page, decode

    ids, mask = tokens
    in_process_run(super_expert, "float32", tmp_path / "run", ids, mask, num_stages=2, capture=EVERYTHING)
    analyse(str(tmp_path / "run"))
    layout = RunLayout.of(str(tmp_path / "run"))
    page = Page()
    page.feed(Path(layout.report("html")).read_text())
    assert page.tables["super_experts"][1][:2] == [str(LAYER), str(EXPERT)] and len(page.tables["super_experts"]) == 2
    assert page.tables["massive_activations"][1][:3] == [str(DIM), str(LAYER), "5"]
    (row,) = [r for r in page.tables["attribution"][1:] if r[0] == str(DIM)]
    assert row[1].startswith(f"{LAYER}:{EXPERT} (")
    assert all(decode(page_image(page, name)).size[0] > 100 for name in ("experts", "massive_depth"))
    assert "## Super experts" in Path(layout.report("md")).read_text()
    assert pl.read_parquet(layout.experts).filter(layer=LAYER, expert=EXPERT)["max_abs"].item() > 100

    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "analysis", "explain", str(tmp_path / "run"), "--dim", str(DIM)],
                          capture_output=True, text=True, cwd=repo, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"written by (layer:expert, outputs >= floor): {LAYER}:{EXPERT} (" in done.stdout
    assert "passes in 100% of resamples" in done.stdout and "largest at (seq, pos, token)" in done.stdout
    done = subprocess.run([sys.executable, "-m", "analysis", "compare", str(tmp_path / "run"),
                           "--output", str(tmp_path / "cmp")], capture_output=True, text=True, cwd=repo, timeout=300)
    assert done.returncode == 0, done.stderr
    compared = pl.read_csv(tmp_path / "cmp" / "compare.csv")
    assert compared["super experts"].to_list() == [f"{LAYER}:{EXPERT}"]
    assert compared["massive dims"].cast(pl.String).to_list() == [str(DIM)]


def page_image(page, name: str) -> bytes:
    import base64

    return base64.b64decode(page.images[name].split(",", 1)[1])


@pytest.mark.parametrize("arch, message", [
    ("llama4_text", r"^capture.routing / capture.experts: model_type='llama4_text' \(Llama 4 \(text\)\) weights "
                    r"each token before its experts.*turn them off for this family.$"),
    ("qwen3", r"^capture.routing / capture.experts: model_type='qwen3' has no layer with a routed experts module"),
])
def test_routing_captures_are_refused_in_one_line_where_they_cannot_work(model_cache, arch, message):
    from actors.anatomy import anatomy
    from actors.checkpoint import load_config
    from cluster.tiny_model import TinySpec, build_tiny
    from common.errors import ModelError

    path = build_tiny(TinySpec(arch=arch, num_layers=2, hidden_size=64), model_cache)
    with pytest.raises(ModelError, match=message):
        anatomy(path, load_config(path), capture=CaptureConfig(routing=True))
    anatomy(path, load_config(path), capture=CaptureConfig(residual=True))  # the residual stream is any model's


class LoopExperts(torch.nn.Module):
    """Experts that accumulate their weighted outputs one expert at a time in bf16, as an eager
    loop does: not what `combine` computes, so the probe must keep this module's own call."""

    num_experts = 4

    def __init__(self, hidden: int = 16):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(self.num_experts, hidden, hidden, generator=torch.Generator()
                                                     .manual_seed(0)).to(torch.bfloat16))

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for expert in range(self.num_experts):
            token, slot = (top_k_index == expert).nonzero(as_tuple=True)
            out.index_add_(0, token, (hidden_states[token] @ self.weight[expert]) * top_k_weights[token, slot, None])
        return out


class FusedExperts(LoopExperts):
    """The same experts, combined as the fused kernels do."""

    def forward(self, hidden_states, top_k_index, top_k_weights):
        from actors.moe import combine, per_pair

        return combine(per_pair(super().forward, hidden_states, top_k_index), top_k_weights, hidden_states)


@pytest.mark.parametrize("combines", [True, False])
@torch.no_grad()
def test_experts_run_once_only_where_combining_their_pairs_is_exact(combines):
    from actors.moe import MoeProbe

    module = FusedExperts() if combines else LoopExperts()
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(64, 16, generator=gen).to(torch.bfloat16)  # [tokens, hidden]
    index = torch.stack([torch.randperm(4, generator=gen)[:3] for _ in range(64)])  # [tokens, k=3]
    weights = torch.rand(64, 3, generator=gen).to(torch.bfloat16)
    expected = module(hidden, index, weights)
    probe = MoeProbe({0: (module, [])}, routing=False, experts=True, floor=1.0)
    probe.keep = torch.ones(1, 64, dtype=torch.bool)
    for _ in range(2):
        assert torch.equal(module(hidden, index, weights), expected)
        assert probe.pop()[0]["experts"]["tokens"].sum() == 64 * 3
    assert probe.exact == {0: combines}
    probe.remove()
    assert torch.equal(module(hidden, index, weights), expected)


@torch.no_grad()
def test_expert_statistics_skip_the_mask_only_when_no_token_is_padding():
    from actors.moe import MoeProbe

    module = FusedExperts()
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(64, 16, generator=gen).to(torch.bfloat16)  # [tokens, hidden]
    index = torch.stack([torch.randperm(4, generator=gen)[:3] for _ in range(64)])  # [tokens, k=3]
    weights = torch.rand(64, 3, generator=gen).to(torch.bfloat16)
    probe = MoeProbe({0: (module, [])}, routing=False, experts=True, floor=1.0)

    def stats(keep):
        probe.keep = keep
        module(hidden, index, weights)
        return probe.pop()[0]["experts"]

    unmasked, masked = stats(None), stats(torch.ones(1, 64, dtype=torch.bool))
    assert masked.keys() == unmasked.keys()
    assert all(torch.equal(masked[key], unmasked[key]) for key in masked)
    # The same pairs with the last 10 tokens as padding: their 30 pairs are dropped, no more.
    keep = torch.ones(1, 64, dtype=torch.bool)
    keep[0, 54:] = False
    padded = stats(keep)
    assert padded["tokens"].sum() == 54 * 3
    assert torch.equal(padded["tokens"], torch.bincount(index[:54].reshape(-1), minlength=4))
    assert (padded["token"] < 54).all() and (unmasked["token"] >= 0).all()
    probe.remove()
