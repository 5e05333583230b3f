"""Budgets, picking, sharing one budget across references: exact counts, properties, bad inputs."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage import data
from sparse_context.selectors import (
    Budget,
    edge_scores,
    grid_ranking,
    mask_scores,
    pick_tokens,
    random_scores,
    select,
    share_budget,
)


def image(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).float().div(255.0)[None]


# ---------------------------------------------------------------- Budget.token_count


@pytest.mark.parametrize("n", [1, 7, 100, 4096])
@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.3, 0.5, 1.0])
def test_ratio_and_count_budgets_are_exact(n, ratio):
    assert Budget(mode="ratio", ratio=ratio).token_count(n_tokens=n) == math.floor(ratio * n + 0.5 + 1e-9)
    assert Budget(mode="count", count=50).token_count(n_tokens=n) == min(50, n)
    assert Budget(ratio=0.25).token_count(torch.zeros(64, 64)) == 1024
    assert Budget(ratio=0.3).token_count(n_tokens=10) == 3  # 0.3 * 10 = 2.9999999999999996 in floats


def test_adaptive_flat_gets_min_and_counts_follow_mass():
    b = Budget(mode="adaptive", mass=0.5, min_ratio=0.1, max_ratio=0.9)
    for flat in (torch.zeros(10, 10), torch.full((10, 10), 3.0)):
        assert b.token_count(flat) == 10, "all-equal scores must give the minimum (min_ratio * N)"
    peaked = torch.zeros(10, 10)
    peaked[0, : 20 // 10] = 1.0
    peaked.view(-1)[:20] = 1.0  # 20 tokens hold all the mass: half of it = 10 tokens
    assert Budget(mode="adaptive", mass=0.5, min_ratio=0.0, max_ratio=1.0).token_count(peaked) == 10
    assert Budget(mode="adaptive", mass=0.5, min_ratio=0.0, max_ratio=1.0).token_count(peaked * 7 + 2) == 10
    assert Budget(mode="adaptive", mass=1.0, min_ratio=0.0, max_ratio=0.15).token_count(peaked) == 15
    assert Budget(mode="adaptive", mass=0.5, min_ratio=0.0, max_ratio=1.0).token_count(peaked, n_tokens=400) == 40


def test_adaptive_gives_plain_photo_fewer_tokens_than_busy_photos():
    """Adaptive on edge density: the sky corner of `rocket` needs far fewer tokens than full busy photos."""
    b = Budget(mode="adaptive", mass=0.8, min_ratio=0.05, max_ratio=1.0)
    sky = edge_scores(image(data.rocket()[:200, :250]))[0]
    frac_sky = b.token_count(sky) / sky.numel()
    for name in ("astronaut", "chelsea", "coffee"):
        e = edge_scores(image(getattr(data, name)()))[0]
        frac = b.token_count(e) / e.numel()
        assert frac_sky < 0.6 * frac, f"plain sky keeps {frac_sky:.0%} of its tokens, {name} {frac:.0%}"
    flat = edge_scores(torch.full((1, 256, 256, 3), 0.4))[0]
    assert b.token_count(flat) == round(0.05 * 256), "a flat picture must get the minimum"


# ---------------------------------------------------------------- pick_tokens


def test_pick_edge_cases_and_ties_follow_grid_ranking():
    s = torch.rand(6, 9, generator=torch.Generator().manual_seed(0))
    assert pick_tokens(s, 0).numel() == 0
    assert torch.equal(pick_tokens(s, 54), torch.arange(54))
    zeros = torch.zeros(6, 9)
    for seed in (0, 3):
        assert torch.equal(pick_tokens(zeros, 13, seed=seed), torch.sort(grid_ranking((6, 9), seed)[:13]).values)
    top = pick_tokens(s, 5)
    assert torch.equal(top, torch.sort(torch.argsort(s.flatten(), descending=True)[:5]).values)


def test_pick_is_deterministic_and_device_independent():
    s = random_scores(1, (33, 47), 4)[0].round(decimals=1)  # many ties
    a = pick_tokens(s, 300, coverage=0.2, seed=9)
    assert torch.equal(a, pick_tokens(s.clone(), 300, coverage=0.2, seed=9))
    assert torch.equal(a, pick_tokens(s.double(), 300, coverage=0.2, seed=9))
    if torch.cuda.is_available():
        assert torch.equal(a, pick_tokens(s.cuda(), 300, coverage=0.2, seed=9).cpu())


@pytest.mark.parametrize("grid", [(64, 64), (48, 80), (63, 63), (30, 17)])
def test_coverage_floor_leaves_no_empty_window(grid):
    """Provable (grid_ranking docstring): ceil(coverage*k) >= ceil(h/s)*ceil(w/s) covers every s x s window.

    With coverage 0.25 and k = N/4 on a 64x64 grid, ceil(k/4) = 256 = (64/4)^2: every 4x4 window keeps a token,
    even when all the scores sit in one corner.
    """
    h, w = grid
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    s = 1.0 / (1 + yy + xx).double()  # all the evidence in the top-left corner
    k = round(0.25 * h * w)
    win = 4
    while math.ceil(0.25 * k) < math.ceil(h / win) * math.ceil(w / win):
        win *= 2
    keep = torch.zeros(h * w)
    keep[pick_tokens(s, k, coverage=0.25)] = 1
    windows = torch.nn.functional.max_pool2d(keep.view(1, 1, h, w), win, stride=1)
    assert bool((windows > 0).all()), f"grid {grid}: an empty {win}x{win} window at coverage 0.25, k={k}"
    none = torch.zeros(h * w)
    none[pick_tokens(s, k, coverage=0.0)] = 1
    empty = torch.nn.functional.max_pool2d(none.view(1, 1, h, w), win, stride=1)
    assert not bool((empty > 0).all()), "without the floor the corner-heavy map must leave windows empty"


def test_select_per_item_and_onto_another_grid():
    s = torch.stack([random_scores(1, (16, 16), 1)[0], torch.zeros(16, 16)])
    picks = select(s, Budget(ratio=0.25, coverage=0.5))
    assert [p.numel() for p in picks] == [64, 64]
    fine = select(s[0], Budget(ratio=0.5), grid=(32, 32))
    assert len(fine) == 1 and fine[0].numel() == 512 and int(fine[0].max()) < 1024


# ---------------------------------------------------------------- share_budget


def test_share_budget_exact_and_follows_weights():
    a, b, c = torch.ones(10, 10), torch.ones(10, 10), torch.ones(20, 20)
    assert share_budget([a, b], 100, weights=[3, 1]) == [75, 25]
    assert share_budget([a, b], 101, weights=[1, 1]) == [51, 50]
    assert share_budget([a, b, c], 1000) == [100, 100, 400]  # more than all tokens: everything
    got = share_budget([a, c], 300, weights=[10, 1])  # a capped at 100, the rest goes to c
    assert got == [100, 200]
    half = torch.zeros(10, 10)
    half[:5] = 1
    assert share_budget([a, half], 90) == [60, 30]  # mass 100 vs 50
    assert share_budget([torch.zeros(4, 4), torch.zeros(2, 2)], 10) == [8, 2]  # no mass: by capacity
    assert share_budget([a, torch.zeros(2, 2)], 102) == [100, 2]  # overflow reaches the empty map


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12)), min_size=1, max_size=5),
    total=st.integers(0, 700),
    data_=st.data(),
)
def test_share_budget_properties(sizes, total, data_):
    weights = data_.draw(st.lists(st.floats(0, 10), min_size=len(sizes), max_size=len(sizes)))
    maps = [random_scores(1, hw, i)[0] for i, hw in enumerate(sizes)]
    got = share_budget(maps, total, weights)
    caps = [h * w for h, w in sizes]
    assert sum(got) == min(total, sum(caps)), f"{got} sums to {sum(got)}, expected {min(total, sum(caps))}"
    assert all(0 <= g <= cap for g, cap in zip(got, caps, strict=True)), f"{got} exceeds caps {caps}"


# ---------------------------------------------------------------- properties


@settings(max_examples=200, deadline=None)
@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    frac=st.floats(0, 1),
    coverage=st.floats(0, 0.99),
    seed=st.integers(0, 2**31 - 1),
    ties=st.booleans(),
)
def test_pick_tokens_properties(h, w, frac, coverage, seed, ties):
    s = random_scores(1, (h, w), seed)[0]
    if ties:
        s = (s * 3).floor()
    k = round(frac * h * w)
    idx = pick_tokens(s, k, coverage=coverage, seed=seed)
    assert idx.dtype == torch.long and idx.shape == (k,)
    assert torch.equal(idx, torch.unique(idx)), "indices not sorted and unique"
    assert k == 0 or (int(idx.min()) >= 0 and int(idx.max()) < h * w)
    n_cov = min(k, math.ceil(coverage * k - 1e-9))
    assert set(grid_ranking((h, w), seed)[:n_cov].tolist()) <= set(idx.tolist()), "coverage floor missing"
    rest = torch.ones(h * w, dtype=torch.bool)
    rest[idx] = False
    kept_free = torch.ones(h * w, dtype=torch.bool)
    kept_free[grid_ranking((h, w), seed)[:n_cov]] = False
    chosen = kept_free.clone()
    chosen[rest] = False
    if rest.any() and chosen.any():
        assert float(s.flatten()[chosen].min()) >= float(s.flatten()[rest].max()), (
            "a dropped token outscored a kept one"
        )


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 30),
    w=st.integers(1, 30),
    ratio=st.floats(0, 1),
    mode=st.sampled_from(["ratio", "count", "adaptive"]),
)
def test_budget_counts_in_range(h, w, ratio, mode):
    s = random_scores(1, (h, w), h * 31 + w)[0]
    b = Budget(mode=mode, ratio=ratio, count=int(ratio * 1000), min_ratio=ratio / 2, max_ratio=ratio)
    k = b.token_count(s)
    assert 0 <= k <= h * w
    if mode == "adaptive":
        assert round(ratio / 2 * h * w + 1e-9) <= k <= math.floor(ratio * h * w + 0.5 + 1e-9)
    assert select(s, b)[0].numel() == k


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "fraction"}, r"mode: expected one of \('ratio', 'count', 'adaptive'\), got 'fraction'"),
        ({"ratio": 1.5}, r"ratio: expected a number in \[0, 1\], got 1.5"),
        ({"ratio": float("nan")}, r"ratio: expected a number in \[0, 1\]"),
        ({"count": -3}, r"count: expected a finite int >= 0, got -3"),
        ({"count": 2.5}, r"count: expected a finite int >= 0"),
        ({"mass": 0.0}, r"mass: expected a number in \(0, 1\], got 0.0"),
        ({"min_ratio": 0.6, "max_ratio": 0.5}, r"min_ratio: must be <= max_ratio, got 0.6 > 0.5"),
        ({"coverage": 1.0}, r"coverage: expected a number in \[0, 1\), got 1.0"),
    ],
)
def test_budget_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Budget(**kwargs)


def test_pick_and_share_validation():
    with pytest.raises(ValueError, match=r"k: expected an int in \[0, 12\]"):
        pick_tokens(torch.zeros(3, 4), 13)
    with pytest.raises(
        ValueError, match=r"scores: expected a score map of shape \(h, w\), got tensor of shape \(1, 3, 4\)"
    ):
        pick_tokens(torch.zeros(1, 3, 4), 2)
    with pytest.raises(ValueError, match="scores: contains NaN or infinite"):
        pick_tokens(torch.tensor([[1.0, float("inf")]]), 1)
    with pytest.raises(ValueError, match=r"coverage: expected a number in \[0, 1\)"):
        pick_tokens(torch.zeros(3, 4), 2, coverage=-0.1)
    with pytest.raises(ValueError, match="scores: required for mode 'adaptive'"):
        Budget(mode="adaptive").token_count(n_tokens=10)
    with pytest.raises(ValueError, match="scores: is empty"):
        Budget().token_count(torch.zeros(0, 4))
    with pytest.raises(ValueError, match=r"weights: expected 2 weights"):
        share_budget([torch.ones(2, 2)] * 2, 3, weights=[1])
    with pytest.raises(ValueError, match=r"scores_list\[1\]: scores must be >= 0"):
        share_budget([torch.ones(2, 2), -torch.ones(2, 2)], 3)
    with pytest.raises(ValueError, match="total: expected a finite int >= 0"):
        share_budget([torch.ones(2, 2)], -1)
    with pytest.raises(ValueError, match="seed: expected a finite int >= 0"):
        random_scores(1, (2, 2), seed=-1)
    with pytest.raises(ValueError, match=r"grid: expected \(h_tok, w_tok\)"):
        random_scores(1, (0, 2))
    with pytest.raises(ValueError, match="budget: expected a Budget"):
        select(torch.zeros(2, 2), 0.5)
    with pytest.raises(ValueError, match="mask: is empty"):
        mask_scores(torch.zeros(0, 5))
