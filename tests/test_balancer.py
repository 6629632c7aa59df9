"""The dynamic self-adaptive balancer (METHOD.md 5a-5c): magnitudes, rates, weights, periods, state."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import BalancerConfig
from pipeline.errors import ConfigError
from stages.distill.balancer import DynamicBalancer, parse_period

NAMES = ["cd", "fd", "hnd"]


def losses(*values: float, grad: bool = False) -> dict[str, torch.Tensor]:
    return {n: torch.tensor(float(v), requires_grad=grad) for n, v in zip(NAMES, values, strict=True)}


def run_period(balancer: DynamicBalancer, *values: float, batches: int = 2) -> None:
    """One epoch whose batches all have the given raw losses."""
    for _ in range(batches):
        balancer(losses(*values))
    assert balancer.end_epoch()


def test_first_batch_is_balanced_by_its_own_values():
    balancer = DynamicBalancer(NAMES)
    total = balancer(losses(2.0, 0.5, 8.0))
    assert balancer.magnitudes == pytest.approx({"cd": 4.0, "fd": 16.0, "hnd": 1.0})
    # Every a_m * L_m is 8, and w = 1 in the first period.
    assert total.item() == pytest.approx(24.0)


def test_first_period_uses_the_running_mean_of_the_period():
    balancer = DynamicBalancer(NAMES)
    balancer(losses(2.0, 1.0, 4.0))
    balancer(losses(4.0, 1.0, 4.0))
    # Running means 3, 1, 4.
    assert balancer.magnitudes == pytest.approx({"cd": 4 / 3, "fd": 4.0, "hnd": 1.0})


def test_later_periods_equalise_the_previous_period_means():
    balancer = DynamicBalancer(NAMES)
    balancer(losses(1.0, 0.2, 6.0))
    balancer(losses(3.0, 0.6, 2.0))
    balancer.end_epoch()  # means 2, 0.4, 4
    balancer(losses(100.0, 100.0, 100.0))  # this batch's values do not matter any more
    a = balancer.magnitudes
    assert a == pytest.approx({"cd": 2.0, "fd": 10.0, "hnd": 1.0})
    means = {"cd": 2.0, "fd": 0.4, "hnd": 4.0}
    assert {n: a[n] * means[n] for n in NAMES} == pytest.approx({n: 4.0 for n in NAMES})


def test_weights_are_exactly_one_for_the_first_two_periods():
    balancer = DynamicBalancer(NAMES)
    assert list(balancer.weights.values()) == [1.0, 1.0, 1.0]
    run_period(balancer, 9.0, 3.0, 1.0)
    assert list(balancer.weights.values()) == [1.0, 1.0, 1.0]
    assert list(balancer.rates.values()) == [1.0, 1.0, 1.0]
    run_period(balancer, 3.0, 2.0, 1.0)
    assert list(balancer.weights.values()) != [1.0, 1.0, 1.0]


def test_rates_and_weights_follow_the_formula():
    balancer = DynamicBalancer(NAMES, temperature=0.5)
    run_period(balancer, 10.0, 4.0, 2.0)
    run_period(balancer, 5.0, 3.0, 2.0)
    rates = [0.5, 0.75, 1.0]
    assert list(balancer.rates.values()) == pytest.approx(rates)
    exps = [math.exp(r / 0.5) for r in rates]
    expected = [3 * e / sum(exps) for e in exps]
    assert list(balancer.weights.values()) == pytest.approx(expected)
    assert sum(balancer.weights.values()) == pytest.approx(3.0)


def test_the_slowest_falling_loss_gets_the_most_weight():
    balancer = DynamicBalancer(NAMES)
    run_period(balancer, 10.0, 10.0, 10.0)
    run_period(balancer, 5.0, 9.0, 7.0)  # cd falls fastest, fd slowest
    w = balancer.weights
    assert w["fd"] > w["hnd"] > w["cd"]
    run_period(balancer, 4.9, 4.0, 6.0)  # now cd barely moves and fd halves
    w = balancer.weights
    assert w["cd"] > w["hnd"] > w["fd"]
    assert sum(w.values()) == pytest.approx(3.0)


def test_three_periods_magnitudes_from_the_last_and_rates_from_the_last_two():
    balancer = DynamicBalancer(NAMES)
    periods = [
        [(8.0, 2.0, 1.0), (4.0, 2.0, 3.0)],  # means 6, 2, 2
        [(3.0, 1.0, 2.0), (3.0, 3.0, 2.0)],  # means 3, 2, 2
        [(1.5, 1.0, 4.0), (1.5, 0.5, 4.0)],  # means 1.5, 0.75, 4
    ]
    for batches in periods[:2]:
        for values in batches:
            balancer(losses(*values))
        assert balancer.end_epoch()
    balancer(losses(7.0, 7.0, 7.0))
    # After two periods: a from period 2 (max 3 over 3, 2, 2), r = period 2 / period 1.
    assert balancer.magnitudes == pytest.approx({"cd": 1.0, "fd": 1.5, "hnd": 1.5})
    assert balancer.rates == pytest.approx({"cd": 0.5, "fd": 1.0, "hnd": 1.0})

    balancer = DynamicBalancer(NAMES)
    for batches in periods:
        for values in batches:
            balancer(losses(*values))
        assert balancer.end_epoch()
    total = balancer(losses(1.0, 2.0, 0.5))
    # a from period 3 only: max 4 over 1.5, 0.75, 4 (period 2 would give 1, 1.5, 1.5; period 1 1, 3, 3).
    a = {"cd": 4 / 1.5, "fd": 4 / 0.75, "hnd": 1.0}
    assert balancer.magnitudes == pytest.approx(a)
    # r = period 3 / period 2 (over period 1, cd would be 0.25).
    r = {"cd": 0.5, "fd": 0.375, "hnd": 2.0}
    assert balancer.rates == pytest.approx(r)
    exps = {n: math.exp(r[n]) for n in NAMES}  # T = 1
    w = {n: 3 * exps[n] / sum(exps.values()) for n in NAMES}
    assert balancer.weights == pytest.approx(w)
    raw = {"cd": 1.0, "fd": 2.0, "hnd": 0.5}
    assert total.item() == pytest.approx(sum(w[n] * a[n] * raw[n] for n in NAMES))


def test_weights_sum_to_m_over_many_periods():
    balancer = DynamicBalancer(NAMES)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        values = (torch.rand(3, generator=g) * 5 + 0.1).tolist()
        run_period(balancer, *values)
        assert sum(balancer.weights.values()) == pytest.approx(3.0)
        assert all(w > 0 for w in balancer.weights.values())


def test_no_gradient_flows_through_weights_or_magnitudes():
    balancer = DynamicBalancer(NAMES)
    run_period(balancer, 10.0, 1.0, 4.0)
    run_period(balancer, 6.0, 0.9, 1.0)
    inputs = losses(3.0, 0.5, 2.0, grad=True)
    total = balancer(inputs)
    total.backward()
    w, a = balancer.weights, balancer.magnitudes
    for name in NAMES:
        # d total / d L_m = w_m * a_m: nothing from w or a themselves.
        assert inputs[name].grad.item() == pytest.approx(w[name] * a[name], rel=1e-6)
    expected = sum(w[n] * a[n] * inputs[n].item() for n in NAMES)
    assert total.item() == pytest.approx(expected, rel=1e-6)


def test_no_gradient_through_first_period_running_magnitudes():
    balancer = DynamicBalancer(NAMES)
    inputs = losses(2.0, 0.5, 8.0, grad=True)
    balancer(inputs).backward()
    assert [inputs[n].grad.item() for n in NAMES] == pytest.approx([4.0, 16.0, 1.0])


def test_scaled_rates_are_equal_the_official_bug_while_raw_rates_differ():
    scaled = DynamicBalancer(NAMES, rate_on="scaled")
    raw = DynamicBalancer(NAMES, rate_on="raw")
    for balancer in (scaled, raw):
        run_period(balancer, 10.0, 4.0, 2.0)
        run_period(balancer, 5.0, 3.9, 1.6)
    scaled_rates = list(scaled.rates.values())
    assert scaled_rates[0] == scaled_rates[1] == scaled_rates[2]
    assert list(scaled.weights.values()) == pytest.approx([1.0, 1.0, 1.0])
    assert len(set(raw.rates.values())) == 3
    assert max(raw.weights.values()) - min(raw.weights.values()) > 0.1


def test_disabled_balancer_is_a_plain_sum():
    balancer = DynamicBalancer(NAMES, enabled=False)
    run_period(balancer, 10.0, 1.0, 4.0)
    run_period(balancer, 6.0, 0.9, 1.0)
    inputs = losses(3.0, 0.5, 2.0, grad=True)
    total = balancer(inputs)
    total.backward()
    assert total.item() == pytest.approx(5.5)
    assert [inputs[n].grad.item() for n in NAMES] == [1.0, 1.0, 1.0]
    assert list(balancer.weights.values()) == list(balancer.magnitudes.values()) == [1.0, 1.0, 1.0]


def test_step_periods_close_every_n_steps_and_ignore_epochs():
    balancer = DynamicBalancer(NAMES, period="3")
    closed = []
    for step in range(7):
        balancer(losses(1.0 + step, 1.0, 1.0))
        closed.append(balancer.end_step())
        assert not balancer.end_epoch()
    assert closed == [False, False, True, False, False, True, False]
    assert balancer.periods_done == 2
    # Means of steps 3..5 over steps 0..2: cd 5/2, the others 1.
    assert balancer.history == [pytest.approx([2.0, 1.0, 1.0]), pytest.approx([5.0, 1.0, 1.0])]
    assert list(balancer.rates.values()) == pytest.approx([2.5, 1.0, 1.0])


def test_epoch_periods_ignore_steps():
    balancer = DynamicBalancer(NAMES, period="epoch")
    balancer(losses(1.0, 1.0, 1.0))
    assert not balancer.end_step()
    assert balancer.end_epoch()
    assert not balancer.end_epoch()  # nothing recorded since: no empty period


def test_zero_losses_keep_magnitude_one_and_rate_one():
    balancer = DynamicBalancer(NAMES)
    # CD is exactly 0 while its queue is empty.
    total = balancer(losses(0.0, 0.5, 2.0))
    assert torch.isfinite(total)
    assert balancer.magnitudes == pytest.approx({"cd": 1.0, "fd": 4.0, "hnd": 1.0})
    balancer.end_epoch()
    run_period(balancer, 3.0, 0.5, 2.0)
    assert balancer.rates["cd"] == 1.0
    assert all(math.isfinite(w) for w in balancer.weights.values())


def test_unrecorded_batches_do_not_move_the_means():
    balancer = DynamicBalancer(NAMES)
    balancer(losses(2.0, 2.0, 2.0))
    balancer(losses(50.0, 1.0, 1.0), record=False)
    balancer.end_epoch()
    assert balancer.history == [pytest.approx([2.0, 2.0, 2.0])]


def test_state_round_trip_continues_identically():
    first = DynamicBalancer(NAMES)
    run_period(first, 10.0, 4.0, 2.0)
    run_period(first, 5.0, 3.0, 1.5)
    first(losses(4.0, 2.0, 1.0))  # mid-period
    state = first.state_dict()
    second = DynamicBalancer(NAMES)
    second.load_state_dict(torch.load(_saved(state), weights_only=True))
    for balancer in (first, second):
        balancer(losses(3.0, 2.5, 1.0))
        balancer.end_epoch()
    assert second.history == first.history
    assert second.weights == first.weights
    t1, t2 = first(losses(1.0, 1.0, 1.0)), second(losses(1.0, 1.0, 1.0))
    assert t1.item() == pytest.approx(t2.item())


def test_state_round_trip_mid_step_period_closes_at_the_same_step():
    # Period = 3 optimiser steps; the state is saved two steps into the second period.
    values = [(4.0, 2.0, 1.0), (2.0, 2.0, 3.0), (3.0, 5.0, 2.0)]  # means 3, 3, 2
    values += [(1.0, 3.0, 2.0), (2.0, 1.0, 1.0), (3.0, 2.0, 0.5)]  # means 2, 2, 7/6
    values += [(1.0, 1.0, 1.0), (0.5, 2.0, 1.5), (1.5, 1.5, 0.5)]  # means 1, 1.5, 1
    uninterrupted = DynamicBalancer(NAMES, period="3")
    trace = []
    for step, batch in enumerate(values):
        total = uninterrupted(losses(*batch)).item()
        trace.append((total, uninterrupted.end_step(), uninterrupted.weights))
        if step == 4:
            state = uninterrupted.state_dict()
    assert [closed for _, closed, _ in trace] == [False, False, True] * 3

    resumed = DynamicBalancer(NAMES, period="3")
    resumed.load_state_dict(torch.load(_saved(state), weights_only=True))
    for step in range(5, len(values)):
        total = resumed(losses(*values[step])).item()
        expected_total, expected_closed, expected_weights = trace[step]
        assert resumed.end_step() == expected_closed, f"step {step}"
        assert total == pytest.approx(expected_total)
        assert resumed.weights == pytest.approx(expected_weights)
    assert resumed.history == [pytest.approx([2.0, 2.0, 7 / 6]), pytest.approx([1.0, 1.5, 1.0])]
    assert resumed.rates == pytest.approx({"cd": 0.5, "fd": 0.75, "hnd": 6 / 7})


def _saved(state: dict):
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_state_of_other_losses_is_refused():
    state = DynamicBalancer(["cd", "fd"]).state_dict()
    with pytest.raises(ConfigError, match="distill.losses"):
        DynamicBalancer(NAMES).load_state_dict(state)


def test_from_config_and_bad_settings():
    balancer = DynamicBalancer.from_config(NAMES, BalancerConfig(temperature=2.0, period="100", rate_on="scaled"))
    assert balancer.period_steps == 100 and balancer.temperature == 2.0 and balancer.rate_on == "scaled"
    assert parse_period("epoch") is None and parse_period("25") == 25
    for bad in ("0", "-3", "weekly", "1.5"):
        with pytest.raises(ConfigError, match="distill.balancer.period"):
            parse_period(bad)
    with pytest.raises(ConfigError, match="temperature"):
        DynamicBalancer(NAMES, temperature=0.0)
    with pytest.raises(ConfigError, match="missing"):
        DynamicBalancer(NAMES)({"cd": torch.tensor(1.0)})


def test_log_values_name_every_loss():
    balancer = DynamicBalancer(NAMES)
    balancer(losses(1.0, 2.0, 4.0))
    values = balancer.log_values()
    assert values["balancer/a_cd"] == pytest.approx(4.0)
    assert values["balancer/w_hnd"] == 1.0 and values["balancer/r_fd"] == 1.0
    assert len(values) == 9


def _ddp_worker(rank: int, init_file: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        balancer = DynamicBalancer(NAMES)
        for _ in range(rank + 1):  # ranks saw different losses (and here even different counts)
            balancer(losses(1.0 + 2 * rank, 1.0, 2.0))
        balancer.end_epoch()
        results[rank] = balancer.history
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_share_the_period_means(tmp_path):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    # Rank 0: one batch with cd 1; rank 1: two batches with cd 3 -> mean 7/3 on both.
    assert results[0] == results[1] == [pytest.approx([7 / 3, 1.0, 2.0])]
