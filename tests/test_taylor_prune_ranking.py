"""The latency target's ranking: importance in loss units (LossChange, the per-batch squared Taylor sum over a
channel's whole structure), each group's units taken as a prefix of its own order with savings read at the width
they leave, and the choice that keeps the most importance for the latency it must save (hull edges, cheapest
first). Planted truths: costs and importances of known ratio decide the order; uneven curves never make a group give
up a more important channel before a less important one; a group whose true importance is scaled down goes first."""
import pytest
import torch
import torch.nn.functional as F

from analysis import taylor_prune as tpr
from analysis.taylor_prune.groups import Group
from analysis.taylor_prune.importance import structure_sums
from analysis.taylor_prune.latency import Curve
from analysis.taylor_prune.prune import choose_by_latency, hull_segments
from tests.test_taylor_prune import batches, tiny_vit, zero_channel_


def planted_group(name: str, channels: int, heads: int = 1) -> Group:
    """A group of `channels` channels with no layers: the selection sees only its size, scores and curve."""
    size = {"n": channels}

    def on_prune(removed_per_head: int) -> None:
        size["n"] -= removed_per_head * heads

    return Group("ffn", block=name, stage=0, heads=heads, width=lambda: 8, layout=lambda: [],
                 count=lambda: size["n"], on_prune=on_prune, original=channels)


def linear_curve(channels: int, per_channel: float) -> Curve:
    """Every channel saves `per_channel` of the latency."""
    return Curve([0, channels], [0.0, channels * per_channel])


def scores(table: dict):
    return lambda group: table[group.block]


def test_the_cheaper_per_unit_of_importance_goes_first_and_scaling_importance_reorders():
    """a's channels lose 1 each and save 1, b's lose 3 and save 2: a costs 1 per saving, b 1.5, so a latency that 4
    channels of either can save is taken from a alone. Halve b's true importance (0.75 per saving) and it is b's."""
    a, b = planted_group("a", 10), planted_group("b", 10)
    curves = [linear_curve(10, 1.0), linear_curve(10, 2.0)]
    chosen, _ = choose_by_latency([a, b], curves, scores(dict(a=torch.ones(10), b=3 * torch.ones(10))), 0.1, 4.0)
    assert sorted(chosen[id(a)]) == [0, 1, 2, 3] and id(b) not in chosen
    chosen, _ = choose_by_latency([a, b], curves, scores(dict(a=torch.ones(10), b=1.5 * torch.ones(10))), 0.1, 4.0)
    assert sorted(chosen[id(b)]) == [0, 1] and id(a) not in chosen  # 2 of b's channels save 4


def uneven_curve() -> Curve:
    """A group of 16 whose latency falls in steps (as SIMD widths make it): nothing between 16 and 12 channels, most
    between 12 and 8, nothing from 8 to 4, the rest below."""
    return Curve([1, 4, 8, 12, 16], [0.0, 0.05, 0.05, 0.40, 0.40])


@pytest.mark.parametrize("excess", [0.01, 0.05, 0.1, 0.2, 0.3, 0.39, 0.45, 0.6])
def test_an_uneven_curve_never_takes_a_more_important_channel_before_a_less_important_one(excess):
    """Importances strictly rising in a scrambled channel order, two groups with uneven curves: whatever the
    latency to save, each group loses exactly its k least important channels (a prefix of its order, never units
    picked where the curve happens to be steep), and what the curves predict for those prefixes covers the excess
    unless every unit that saves time went."""
    torch.manual_seed(0)
    groups = [planted_group("a", 16), planted_group("b", 16)]
    order = {g.block: torch.randperm(16) for g in groups}
    table = {g.block: torch.empty(16) for g in groups}
    for g in groups:
        table[g.block][order[g.block]] = torch.arange(1, 17, dtype=torch.float) * (1.0 if g.block == "a" else 1.3)
    curves = [uneven_curve(), Curve([1, 8, 16], [0.0, 0.02, 0.3])]
    chosen, everything = choose_by_latency(groups, curves, scores(table), 0.05, excess)
    saved = 0.0
    for g, curve in zip(groups, curves):
        removed = chosen.get(id(g), [])
        assert sorted(removed) == sorted(order[g.block][:len(removed)].tolist())  # the k lowest
        saved += curve.saving(16, len(removed))
    assert saved >= excess or everything
    assert chosen  # the step removes something


def test_hull_edges_read_each_units_saving_at_the_width_it_leaves():
    """The edges of a group's hull cover its units in order, their slopes rise, and the savings the units add sum to
    the curve's drop from the group's width to the width they leave; units past the last saving are not offered."""
    group = planted_group("a", 16)
    units = tpr.candidate_units(group, torch.arange(1, 17, dtype=torch.float), floor=0.05)
    curve = uneven_curve()
    edges = hull_segments(group, units, curve)
    slopes = [e.slope for e in edges]
    assert slopes == sorted(slopes)
    taken = [u for e in edges for u, _ in e.units]
    assert taken == units[:len(taken)] and [e.start for e in edges] == [0] + [
        sum(len(e.units) for e in edges[:i + 1]) for i in range(len(edges) - 1)]
    for i in range(1, len(taken) + 1):
        added = sum(s for e in edges for _, s in e.units[:max(0, min(len(e.units), i - e.start))])
        assert added == pytest.approx(curve.saving(16, i))
    assert len(taken) == 15  # the unit to 1 channel saves 0.05: offered; nothing beyond the floor


def test_loss_change_is_half_the_mean_squared_per_batch_taylor_sum_over_the_whole_structure():
    """Against a hand computation: for each batch alone, sum w * dL/dw over an FFN channel's fc1 row, fc1 bias and
    fc2 column; LossChange is half the mean of its squares. The summed gradient accumulate_gradients leaves is the
    same with or without the per-batch observer."""
    model = tpr.prunable(tiny_vit()).eval()
    groups = tpr.prepare(model)
    ffn = next(g for g in groups if g.kind == "ffn")
    data = batches(n=3)
    expected = torch.zeros(ffn.channels)
    mlp = model.blocks[0].mlp
    for x, y in data:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        per_channel = ((mlp.fc1.weight * mlp.fc1.weight.grad).sum(1) + mlp.fc1.bias * mlp.fc1.bias.grad
                       + (mlp.fc2.weight * mlp.fc2.weight.grad).sum(0))
        expected += per_channel.detach() ** 2
    importance = tpr.LossChange()
    tpr.accumulate_gradients(model, data, lambda: importance.observe(groups))
    torch.testing.assert_close(importance(ffn), expected / (2 * len(data)))
    summed = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    tpr.accumulate_gradients(model, data)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, summed[n])
    assert structure_sums(ffn).shape == (ffn.channels,)


def test_loss_change_of_dead_channels_is_zero_in_every_kind():
    """Zeroed Q/K, V, FFN and width channels add no loss when removed: their LossChange is exactly 0."""
    model = tpr.prunable(tiny_vit()).eval()
    groups = tpr.prepare(model)
    for g in groups:
        zero_channel_(g, 1 if g.kind != "width" else 2)
    importance = tpr.LossChange()
    tpr.accumulate_gradients(model, batches(), lambda: importance.observe(groups))
    for g in groups:
        score = importance(g)
        assert score[1 if g.kind != "width" else 2] == 0 and score.sum() > 0


@pytest.mark.parametrize("quieter", [0, 1])
def test_a_group_whose_true_importance_is_scaled_down_goes_first(quieter):
    """Two FFNs that cost the same (one planted curve for both): scale one FFN's output by 0.05 and its channels are
    worth less to the loss, so the latency choice takes its channels; scale the other one instead and the choice
    follows. Normalized per group (torch-pruning's mean), both FFNs' scores average 1 whatever the scaling: that
    ranking cannot see it."""
    model = tpr.prunable(tiny_vit()).eval()
    with torch.no_grad():
        fc2 = model.blocks[quieter].mlp.fc2
        fc2.weight.mul_(0.05)
        fc2.bias.mul_(0.05)
    groups = tpr.prepare(model)
    for g in groups:
        g.prunable = g.kind == "ffn"
    ffns = [g for g in groups if g.kind == "ffn"]
    importance = tpr.LossChange()
    tpr.accumulate_gradients(model, batches(n=4), lambda: importance.observe(groups))
    curves = [linear_curve(g.channels, 0.01) if g.kind == "ffn" else None for g in groups]
    chosen, _ = choose_by_latency(groups, curves, importance, 0.1, 0.045)  # 4.5 channels' worth: 5 go
    assert len(chosen.get(id(ffns[quieter]), [])) == 5 and id(ffns[1 - quieter]) not in chosen
    normalized = tpr.TaylorImportance()
    tpr.accumulate_gradients(model, batches(n=4))
    assert [float(normalized(g).mean()) for g in ffns] == pytest.approx([1.0, 1.0])


def test_a_latency_target_refuses_scores_normalized_per_group():
    with pytest.raises(ValueError, match="do not compare across groups"):
        tpr.prune_to_target(tiny_vit(), batches(), importance=tpr.TaylorImportance("mean"), target_latency=0.8)


@pytest.mark.timing
def test_on_a_trained_proxy_the_latency_path_loses_no_more_loss_than_the_mac_path_at_equal_latency():
    """deit_proxy trained on Fashion-MNIST (the quick budget, trained on first use), pruned in one step to 0.7 of its
    measured latency, and the MAC path bisected to the same measured latency (within 3%): on training images neither
    saw, the latency path's loss is no higher."""
    from analysis.taylor_prune.estimate_check import mean_loss
    from experiments import prune_study
    from evit.data import load_batches
    from evit.zoo import load_model

    torch.set_num_threads(1)
    model = load_model("deit_proxy", weights="quick-proxy")
    train, _, _ = load_batches("fashion_mnist", 28, 2, 32, 0)
    held_out, _, _ = load_batches("fashion_mnist", 28, 10, 64, 0)
    latency = tpr.LatencyModel("cpu", batch=8)
    by_latency = prune_study.prune_at("latency", model, train, latency, steps=1)(0.7)
    by_macs = prune_study.match_latency(prune_study.prune_at("macs", model, train, latency, steps=1),
                                        by_latency.model, latency, latency.images(train), probes=7)
    assert abs(by_macs.ratio - 1) <= 0.05, by_macs.probes
    losses = [mean_loss(m.model, held_out[2:]) for m in (by_latency, by_macs.result)]
    assert losses[0] <= losses[1], (losses, by_macs.probes)


def test_estimate_check_measures_a_dead_channel_as_costing_nothing(capsys):
    """The estimate check on a model with a dead FFN channel: every kind is removed and measured, the removal sets
    holding only the dead channel measure no loss change and every estimate predicts none; a bad flag is one line."""
    from analysis.taylor_prune import estimate_check
    from tests.test_train import one_line_error

    model = tiny_vit(mlp_ratio=0.5)  # FFN of 6 channels: an eighth is one channel
    zero_channel_(next(g for g in tpr.prepare(tpr.prunable(model)) if g.kind == "ffn"), 0)
    table = estimate_check.removals(model, batches(), batches(n=2), per_group=20, seed=0)
    assert set(table.kind) == {"qk", "v", "ffn", "width"}
    ffn0 = table[(table.kind == "ffn") & (table.block == "blocks.0")]
    dead = ffn0[ffn0.loss_change == 0]
    assert len(dead) and (dead.measured.abs() < 1e-7).all() and (dead[["taylor_sum", "taylor_mean"]] == 0).all().all()
    summary = estimate_check.estimates(table)
    assert list(summary.estimate) == list(estimate_check.ESTIMATES) and summary.spearman.notna().all()
    err = one_line_error(capsys, ["--removals", "0"], estimate_check.main)
    assert "--batches, --batch, --eval-batches, --removals and --threads must be >= 1" in err
