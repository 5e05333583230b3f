"""Selectors' score maps on real photographs (scikit-image): geometry, edge, saliency, mask, combine.

CPU only, no ComfyUI. Every assertion states the measured values it checked.
"""


import cv2
import numpy as np
import pytest
import torch
from skimage import data
from skimage.transform import resize
from sparse_context.selectors import (
    Budget,
    combine_scores,
    edge_scores,
    grid_ranking,
    grid_scores,
    mask_scores,
    pick_tokens,
    random_scores,
    resize_scores,
    saliency_scores,
    token_grid_shape,
)

PHOTOS = ["astronaut", "chelsea", "coffee", "rocket"]


def photo(name: str) -> np.ndarray:
    return getattr(data, name)()


def as_image(a: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) or float [0, 1] -> ComfyUI IMAGE (1, H, W, 3)."""
    x = torch.from_numpy(np.ascontiguousarray(a)).float()
    return (x / 255.0 if a.dtype == np.uint8 else x)[None]


def token_density(pixels: np.ndarray, grid: tuple[int, int], stride: int = 16) -> np.ndarray:
    """Mean of a (H, W) bool/float map per token (VAE crop, zero padding), independent of the pack."""
    h, w = grid
    canvas = np.zeros((h * stride, w * stride))
    H = min(pixels.shape[0] // (stride // 2) * (stride // 2), h * stride)
    W = min(pixels.shape[1] // (stride // 2) * (stride // 2), w * stride)
    canvas[:H, :W] = pixels[:H, :W]
    return canvas.reshape(h, stride, w, stride).mean(axis=(1, 3))


def kept_mask(idx: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    m = np.zeros(grid[0] * grid[1], bool)
    m[idx.numpy()] = True
    return m.reshape(grid)


# ---------------------------------------------------------------- geometry


@pytest.mark.parametrize("size", [8, 15, 16, 17, 100, 1000, 1023, 1024, 1031])
@pytest.mark.parametrize("stride", [8, 16, 32])
def test_token_grid_shape_matches_vae_crop_then_padded_patchify(size, stride):
    if size < stride // 2:  # the VAE would crop it away: one token, so selectors still score it
        assert token_grid_shape(size, 2 * size, stride) == (1, 1)
        return
    latent = size // (stride // 2)  # VAE crop
    expect = -(-latent // 2)  # 2x2 patchify with padding
    got = token_grid_shape(size, 2 * size, stride)
    assert got == (expect, -(-(2 * size // (stride // 2)) // 2)), f"{size}px stride {stride}: {got}"


def test_token_grid_shape_known_values_and_errors():
    assert token_grid_shape(1024, 1024) == (64, 64)
    assert token_grid_shape(1000, 1016) == (63, 64)
    assert token_grid_shape(7, 64) == (1, 4)  # shorter than one latent pixel: one token
    with pytest.raises(ValueError, match="height: expected a picture side of at least 1 px"):
        token_grid_shape(0, 64)
    with pytest.raises(ValueError, match="stride.*even"):
        token_grid_shape(64, 64, stride=15)


def test_resize_scores_area_mean_when_shrinking_and_constant_when_growing():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 8, 12, generator=g)
    small = resize_scores(x, (4, 3))
    assert torch.allclose(small, x.view(2, 4, 2, 3, 4).mean(dim=(2, 4)), atol=1e-6)
    assert torch.allclose(resize_scores(torch.full((3, 5), 0.7), (10, 9)), torch.full((10, 9), 0.7))
    mixed = resize_scores(x, (16, 6))  # one axis grows, the other shrinks
    assert mixed.shape == (2, 16, 6) and float(mixed.min()) >= 0
    assert abs(float(mixed.mean() - x.mean())) < 0.02, f"mean {float(mixed.mean()):.4f} vs {float(x.mean()):.4f}"
    assert resize_scores(x[0], (8, 12)).shape == (8, 12)


# ---------------------------------------------------------------- random / grid


def test_random_scores_seeded_private_generator():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = random_scores(2, (9, 7), seed=5)
    assert torch.equal(torch.get_rng_state(), state), "random_scores touched the global RNG"
    assert torch.equal(a, random_scores(2, (9, 7), seed=5))
    assert not torch.equal(a, random_scores(2, (9, 7), seed=6))
    assert a.shape == (2, 9, 7) and float(a.min()) >= 0 and float(a.max()) < 1


def test_random_top_k_is_uniform_over_tokens():
    grid, k, trials = (6, 6), 9, 800
    counts = torch.zeros(36)
    for seed in range(trials):
        counts[pick_tokens(random_scores(1, grid, seed)[0], k)] += 1
    expect = trials * k / 36
    chi2 = float(((counts - expect) ** 2 / expect).sum())
    assert chi2 < 75, f"chi2 {chi2:.1f} over 35 dof (p=0.0001 bound 75): top-k of random scores is not uniform"


@pytest.mark.parametrize("grid", [(8, 8), (13, 21), (64, 64), (5, 40)])
@pytest.mark.parametrize("seed", [0, 7])
def test_grid_ranking_every_window_covered_once_k_reaches_lattice(grid, seed):
    """Provable: the first ceil(h/s)*ceil(w/s) tokens cover every s x s window, for each power of two s."""
    h, w = grid
    order = grid_ranking(grid, seed)
    assert sorted(order.tolist()) == list(range(h * w))
    for s in (1, 2, 4, 8):
        if s > min(h, w):
            continue
        k = -(-h // s) * -(-w // s)
        m = torch.from_numpy(kept_mask(order[:k], grid)).float()[None, None]
        windows = torch.nn.functional.max_pool2d(m, s, stride=1)
        assert bool((windows > 0).all()), f"grid {grid} seed {seed}: an {s}x{s} window is empty with k={k}"


def test_grid_scores_spread_evenly_for_every_k_unlike_random():
    grid = (48, 80)
    order = grid_ranking(grid)
    quads = torch.zeros(48, 80, dtype=torch.long)
    quads[24:, :40], quads[:24, 40:], quads[24:, 40:] = 1, 2, 3
    qflat = quads.flatten()[order]

    def worst_excess(ranked_quads: torch.Tensor) -> float:
        """Largest quadrant-count deviation from k/4 beyond the allowance 3 + 2% of k/4, over k."""
        worst = -1e9
        for k in range(16, 48 * 80, 7):
            dev = float((torch.bincount(ranked_quads[:k], minlength=4).double() - k / 4).abs().max())
            worst = max(worst, dev - (3 + 0.02 * k / 4))
        return worst

    grid_excess = worst_excess(qflat)
    assert grid_excess <= 0, f"grid top-k quadrant counts exceed the allowance by {grid_excess:.1f} tokens"
    rand = torch.argsort(random_scores(1, grid, 0).flatten(), descending=True)
    rand_excess = worst_excess(quads.flatten()[rand])
    assert rand_excess > 0, f"the check cannot tell random from stratified (random excess {rand_excess:.1f})"
    g = grid_scores(grid)[0]
    assert g.shape == grid and float(g.max()) == 1.0 and torch.unique(g).numel() == 48 * 80
    assert torch.equal(torch.argsort(g.flatten(), descending=True), order)


# ---------------------------------------------------------------- edges


@pytest.mark.parametrize("name", PHOTOS)
def test_edge_tokens_follow_independent_opencv_canny(name):
    a = photo(name)
    img = as_image(a)
    scores = edge_scores(img, spread=0)[0]
    grid = tuple(scores.shape)
    assert grid == token_grid_shape(a.shape[0], a.shape[1])
    gt = cv2.Canny(cv2.cvtColor(a, cv2.COLOR_RGB2GRAY), 100, 200) > 0  # full resolution, other library
    dens = token_density(gt, grid)
    kept = kept_mask(pick_tokens(scores, Budget(ratio=0.25).token_count(scores)), grid)
    edge_tok, flat_tok = dens > 0.05, dens == 0
    rate_edge, rate_flat = kept[edge_tok].mean(), kept[flat_tok].mean()
    share = (dens * kept).sum() / dens.sum()
    msg = (
        f"{name}: kept {rate_edge:.0%} of cv2-edge tokens vs {rate_flat:.0%} of cv2-flat tokens; "
        f"kept tokens hold {share:.0%} of cv2 edge pixels at 25% of tokens"
    )
    assert rate_edge > 2.5 * rate_flat, msg
    assert share > 0.38, msg


def test_edge_scores_zero_on_flat_picture_and_spread_reaches_neighbours():
    img = torch.full((1, 256, 256, 3), 0.5)
    assert float(edge_scores(img).abs().max()) == 0.0
    img[:, :, 128:] = 0.9  # one vertical step edge at token column 8
    dense = edge_scores(img, spread=0)[0]
    cols = torch.nonzero(dense.sum(0)).flatten().tolist()
    assert len(cols) == 1 and cols[0] in (7, 8), f"one step edge at 128 px lit token columns {cols}"
    c0, peak = cols[0], float(dense.max())
    spread = edge_scores(img, spread=2, spread_weight=0.5)[0]
    assert torch.allclose(spread[:, c0], dense[:, c0])
    for c in (c0 - 2, c0 - 1, c0 + 1, c0 + 2):
        assert torch.allclose(spread[:, c], torch.full((16,), 0.5 * peak)), f"column {c}: {spread[:, c].tolist()}"
    assert float(spread[:, c0 - 3].max()) == 0.0 and float(spread[:, c0 + 3].max()) == 0.0


def test_edge_scores_batch_items_independent_and_in_range():
    a = resize(photo("chelsea"), (256, 384), anti_aliasing=True)
    b = resize(photo("rocket"), (256, 384), anti_aliasing=True)
    batch = torch.cat([as_image(a), as_image(b)])
    s = edge_scores(batch)
    assert s.shape == (2, 16, 24) and float(s.min()) >= 0 and float(s.max()) <= 1
    assert torch.allclose(s[1], edge_scores(as_image(b))[0])


# ---------------------------------------------------------------- saliency


def _horse_composite() -> tuple[np.ndarray, np.ndarray]:
    """A textured photo inside the skimage horse silhouette, on a heavily blurred photo: exact subject mask."""
    inside = ~data.horse()  # data.horse() is True on the background
    H, W = inside.shape
    fg = resize(photo("astronaut"), (H, W), anti_aliasing=True)
    bg = cv2.GaussianBlur(resize(photo("coffee"), (H, W), anti_aliasing=True), (0, 0), 12)
    m = inside.astype(np.float64)[..., None]
    return fg * m + bg * (1 - m), inside


def test_saliency_favours_the_subject():
    comp, inside = _horse_composite()
    s = saliency_scores(as_image(comp))[0]
    cov = token_density(inside, tuple(s.shape))
    s_in, s_out = float(s[torch.from_numpy(cov > 0.99)].mean()), float(s[torch.from_numpy(cov < 0.01)].mean())
    assert s_in > 1.75 * s_out, f"mean saliency inside the horse {s_in:.3f} vs outside {s_out:.3f}"
    kept = kept_mask(pick_tokens(s, round(0.25 * s.numel())), tuple(s.shape))
    frac_in = (kept & (cov > 0.5)).sum() / kept.sum()
    area = (cov > 0.5).mean()
    assert frac_in > area + 0.3, f"{frac_in:.0%} of kept tokens on the horse, which covers {area:.0%} of the picture"


def test_saliency_fills_a_large_plain_subject():
    """A big plain object on a plain background: spectral residual alone lights its outline only;
    the colour-contrast term must put most kept tokens on the object."""
    img = torch.full((1, 256, 256, 3), 0.85)
    img[0, ..., 1] = 0.75
    img[0, 48:240, 96:208] = torch.tensor([0.35, 0.4, 0.1])  # 12x7 of the 16x16 tokens
    inside = np.zeros((16, 16), dtype=bool)
    inside[3:15, 6:13] = True
    k = round(0.25 * 256)
    mixed = kept_mask(pick_tokens(saliency_scores(img)[0], k), (16, 16))
    residual_only = kept_mask(pick_tokens(saliency_scores(img, contrast_weight=0.0)[0], k), (16, 16))
    on_subject = float((mixed & inside).sum()) / k
    only = float((residual_only & inside).sum()) / k
    assert on_subject > 0.6, f"{on_subject:.0%} of kept tokens on the subject (spectral residual only: {only:.0%})"
    assert on_subject > only + 0.1, f"{on_subject:.0%} vs {only:.0%} with spectral residual only"


def test_saliency_shape_range_and_flat_picture():
    s = saliency_scores(as_image(photo("coffee")))
    assert s.shape == (1, *token_grid_shape(400, 600)) and float(s.min()) >= 0 and float(s.max()) <= 1 + 1e-6
    assert float(saliency_scores(torch.full((1, 64, 96, 3), 0.3)).abs().max()) < 1e-6


# ---------------------------------------------------------------- mask


@pytest.mark.parametrize("stride", [8, 16, 32])
def test_mask_inside_outside_dilation_and_feathering(stride):
    h, w = 12, 15
    m = torch.zeros(h * stride, w * stride)
    m[4 * stride : 7 * stride, 5 * stride : 9 * stride] = 1  # tokens rows 4..6, cols 5..8
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[4:7, 5:9] = True
    s = mask_scores(m, stride=stride, inside=0.9, outside=0.2)[0]
    assert s.shape == (h, w)
    assert torch.allclose(s[inside], torch.tensor(0.9)) and torch.allclose(s[~inside], torch.tensor(0.2))
    keep_out = mask_scores(m, stride=stride, inside=0.0, outside=1.0)[0]
    assert torch.equal(keep_out > 0.5, ~inside)
    # Chebyshev distance of every token to the rectangle
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    dy = torch.maximum((4 - yy).clamp(min=0), (yy - 6).clamp(min=0))
    dx = torch.maximum((5 - xx).clamp(min=0), (xx - 8).clamp(min=0))
    dist = torch.maximum(dy, dx)
    dil = mask_scores(m, stride=stride, dilate_tokens=2)[0]
    assert torch.equal(dil > 0.5, dist <= 2)
    fea = mask_scores(m, stride=stride, dilate_tokens=1, feather_tokens=3)[0]
    expect = torch.where(dist <= 1, 1.0, (1 - (dist - 1) / 4).clamp(min=0))
    assert torch.allclose(fea, expect, atol=1e-6), f"stride {stride}: {fea[5]} vs {expect[5]}"


def test_mask_partial_coverage_and_resize_to_image():
    m = torch.zeros(64, 64)
    m[:, :8] = 1  # half of the first token column
    s = mask_scores(m)[0]
    assert torch.allclose(s[:, 0], torch.tensor(0.5)) and float(s[:, 1:].max()) == 0
    img = torch.rand(2, 128, 128, 3)
    small = torch.zeros(1, 32, 32)
    small[:, :16] = 1  # top half, at quarter resolution
    s = mask_scores(small, image=img)
    assert s.shape == (2, 8, 8)
    assert float(s[:, :3].min()) == 1.0 and float(s[:, 5:].max()) == 0.0  # bilinear upscaling blurs rows 3/4
    assert torch.allclose(s[:, 3:5].mean(1), torch.tensor(0.5), atol=1e-6)
    assert mask_scores(small[0], grid=(4, 4)).shape == (1, 4, 4)


def test_mask_errors():
    img = torch.rand(2, 128, 128, 3)
    with pytest.raises(ValueError, match=r"mask: item\(s\) \[1\] are all zero"):
        mask_scores(torch.stack([torch.ones(32, 32), torch.zeros(32, 32)]))
    with pytest.raises(ValueError, match="mask: batch 3 does not match image batch 2"):
        mask_scores(torch.ones(3, 128, 128), image=img)
    with pytest.raises(ValueError, match="aspect ratio"):
        mask_scores(torch.ones(128, 100), image=img)
    mask_scores(torch.ones(128, 126), image=img)  # 1.6 % off: allowed
    with pytest.raises(ValueError, match=r"mask: values must lie in \[0, 1\]"):
        mask_scores(torch.full((32, 32), 255.0))
    with pytest.raises(ValueError, match="mask: expected a MASK of shape"):
        mask_scores(torch.ones(1, 1, 32, 32))
    with pytest.raises(ValueError, match="inside/outside: must differ"):
        mask_scores(torch.ones(32, 32), inside=0.5, outside=0.5)
    with pytest.raises(ValueError, match="dilate_tokens"):
        mask_scores(torch.ones(32, 32), dilate_tokens=-1)


# ---------------------------------------------------------------- combine


def test_combine_normalises_then_mixes_or_maxes():
    a = torch.tensor([[[0.0, 2.0], [4.0, 4.0]]])
    b = torch.tensor([[[1.0, 0.0], [0.0, 0.5]]])
    mix = combine_scores([a, b], weights=[3, 1])
    assert torch.allclose(mix, torch.tensor([[[0.25, 0.375], [0.75, 0.875]]]))
    mx = combine_scores([a, b], mode="max")
    assert torch.allclose(mx, torch.tensor([[[1.0, 0.5], [1.0, 1.0]]]))
    assert combine_scores([torch.zeros(2, 2), b[0]]).shape == (1, 2, 2)
    big = combine_scores([a, torch.ones(1, 4, 4)])  # resized onto the first map's grid
    assert big.shape == (1, 2, 2)


def test_combine_errors():
    with pytest.raises(ValueError, match="maps: expected a non-empty list"):
        combine_scores([])
    with pytest.raises(ValueError, match="mode: expected 'mix' or 'max'"):
        combine_scores([torch.ones(2, 2)], mode="sum")
    with pytest.raises(ValueError, match=r"weights: expected 2 weights"):
        combine_scores([torch.ones(2, 2)] * 2, weights=[1.0])
    with pytest.raises(ValueError, match="weights: all zero"):
        combine_scores([torch.ones(2, 2)], weights=[0.0])
    with pytest.raises(ValueError, match=r"maps\[1\]: contains NaN"):
        combine_scores([torch.ones(2, 2), torch.tensor([[float("nan"), 1.0], [1.0, 1.0]])])
    with pytest.raises(ValueError, match="batch sizes"):
        combine_scores([torch.ones(2, 2, 2), torch.ones(3, 2, 2)])


def test_image_errors():
    with pytest.raises(ValueError, match=r"image: expected a ComfyUI IMAGE of shape \(B, H, W, C\)"):
        edge_scores(torch.rand(64, 64, 3))
    with pytest.raises(ValueError, match="image: contains NaN"):
        saliency_scores(torch.full((1, 32, 32, 3), float("nan")))
    with pytest.raises(ValueError, match="low_threshold"):
        edge_scores(torch.rand(1, 32, 32, 3), low_threshold=0.5, high_threshold=0.1)
    with pytest.raises(ValueError, match="image: is empty"):
        edge_scores(torch.rand(1, 0, 32, 3))
