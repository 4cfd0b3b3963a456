import math

import pytest
import torch

from utils.augment import (
    DSA_STRATEGY,
    DSA_TOKENS,
    DSAParams,
    ParamDCAug,
    ParamDiffAug,
    apply_dsa,
    augment,
    dc_augment,
    dsa,
    sample_dsa_params,
)
from utils.io import UserError


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b=4, c=3, h=16, w=16, seed=0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(b, c, h, w, generator=gen(seed), dtype=dtype)


def one_op(token: str, **values) -> DSAParams:
    return DSAParams([(token, {k: torch.as_tensor(v) for k, v in values.items()})])


def assert_same_params(a: DSAParams, b: DSAParams) -> None:
    assert [op for op, _ in a.ops] == [op for op, _ in b.ops]
    for (_, pa), (_, pb) in zip(a.ops, b.ops, strict=True):
        assert pa.keys() == pb.keys()
        for k in pa:
            assert torch.equal(pa[k], pb[k]), k


# ---- every op: shape, gradients, replay, select ----


@pytest.mark.parametrize("token", DSA_TOKENS)
def test_op_keeps_shape_and_passes_gradients(token):
    x = images(seed=1).requires_grad_(True)
    out = dsa(x, token, generator=gen(2))
    assert out.shape == x.shape
    (out * images(seed=3)).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("token", DSA_TOKENS)
def test_apply_matches_numerical_gradient(token):
    x = images(b=2, h=6, w=6, seed=4, dtype=torch.float64).requires_grad_(True)
    params = sample_dsa_params(2, (6, 6), token, generator=gen(5))
    assert torch.autograd.gradcheck(lambda t: apply_dsa(t, params), (x,))


@pytest.mark.parametrize("token", DSA_TOKENS)
def test_replay_on_same_batch_is_identical(token):
    x = images(b=6, seed=6)
    params = sample_dsa_params(6, (16, 16), token, generator=gen(7))
    assert torch.equal(apply_dsa(x, params), apply_dsa(x, params))
    # dsa() from the same generator state draws the same parameters
    assert torch.equal(dsa(x, token, generator=gen(7)), apply_dsa(x, params))


@pytest.mark.parametrize("token", DSA_TOKENS)
def test_select_gives_the_rows_parameters(token):
    x = images(b=6, seed=8)
    params = sample_dsa_params(6, (16, 16), token, generator=gen(9))
    index = torch.tensor([4, 1, 3])
    full = apply_dsa(x, params)
    torch.testing.assert_close(apply_dsa(x[index], params.select(index)), full[index])
    mask = torch.tensor([True, False, False, True, True, False])
    torch.testing.assert_close(apply_dsa(x[mask], params.select(mask)), full[mask])


def test_to_device_keeps_values_and_batch_size_is_checked():
    param = ParamDiffAug(aug_mode="M")
    params = sample_dsa_params(4, (16, 16), DSA_STRATEGY, generator=gen(10), param=param)
    assert_same_params(params.to("cpu"), params)
    with pytest.raises(ValueError, match="rows"):
        apply_dsa(images(b=5), params)


# ---- flip ----


def test_flip_flips_exactly_the_selected_rows():
    x = torch.arange(3 * 2 * 4 * 5, dtype=torch.float32).view(3, 2, 4, 5)
    out = apply_dsa(x, one_op("flip", flip=[True, False, True]))
    assert torch.equal(out[[0, 2]], torch.flip(x[[0, 2]], dims=[3]))
    assert torch.equal(out[1], x[1])


def test_flip_replayed_on_another_batch_flips_the_same_rows():
    params = sample_dsa_params(16, (8, 8), "flip", generator=gen(11))
    flipped = params.ops[0][1]["flip"]
    assert 0 < flipped.sum() < 16  # the seed gives both cases
    x2 = images(b=16, h=8, w=8, seed=12)
    out = apply_dsa(x2, params)
    assert torch.equal(out[flipped], torch.flip(x2[flipped], dims=[3]))
    assert torch.equal(out[~flipped], x2[~flipped])


# ---- crop (translate) ----


def test_translate_moves_a_bright_pixel_by_the_hand_set_shift():
    x = torch.zeros(2, 1, 10, 10)
    x[:, 0, 5, 4] = 1.0
    out = apply_dsa(x, one_op("crop", tx=[2, -3], ty=[-1, 6]))
    # out[i, j] = x[i + tx, j + ty]: the pixel moves by (-tx, -ty)
    assert out[0, 0, 3, 5] == 1.0 and out[0].sum() == 1.0
    assert out[1].sum() == 0.0  # 4 + 6 = 10 is outside: shifted out, nothing wraps around


def test_translate_fills_borders_with_zero_and_zero_shift_is_identity():
    x = torch.rand(1, 3, 8, 8) + 1.0
    out = apply_dsa(x, one_op("crop", tx=[2], ty=[-1]))
    assert (out[0, :, 6:, :] == 0).all() and (out[0, :, :, :1] == 0).all()
    assert torch.equal(out[0, :, :6, 1:], x[0, :, 2:, :7])
    assert torch.equal(apply_dsa(x, one_op("crop", tx=[0], ty=[0])), x)


def test_translate_matches_the_reference_padded_indexing():
    # docs/algorithms.md#dsa-operations: pad by one, read xpad[clamp(i + tx + 1, 0, H + 1), ...]
    x = images(b=8, h=12, w=9, seed=13)  # not square: rows and columns must not be mixed up
    params = sample_dsa_params(8, (12, 9), "crop", generator=gen(14))
    p = params.ops[0][1]
    xpad = torch.nn.functional.pad(x, [1, 1, 1, 1])
    expected = torch.empty_like(x)
    for b in range(8):
        for i in range(12):
            for j in range(9):
                ii = min(max(i + int(p["tx"][b]) + 1, 0), 13)
                jj = min(max(j + int(p["ty"][b]) + 1, 0), 10)
                expected[b, :, i, j] = xpad[b, :, ii, jj]
    assert torch.equal(apply_dsa(x, params), expected)


def test_translate_samples_integer_shifts_up_to_an_eighth_of_the_size():
    p = sample_dsa_params(2000, (32, 32), "crop", generator=gen(15)).ops[0][1]
    for k in ("tx", "ty"):
        assert p[k].dtype == torch.int64
        assert p[k].min() == -4 and p[k].max() == 4  # round(0.125 * 32)


# ---- cutout ----


def test_cutout_zeroes_at_most_a_half_size_square_and_keeps_the_rest():
    x = torch.rand(64, 3, 32, 32) + 1.0  # no zeros before cutout
    params = sample_dsa_params(64, (32, 32), "cutout", generator=gen(16))
    out = apply_dsa(x, params)
    zeroed = out == 0
    assert torch.equal(out[~zeroed], x[~zeroed])
    per_image = zeroed[:, 0].sum(dim=(1, 2))
    assert (zeroed == zeroed[:, :1]).all()  # same mask for every channel
    assert (per_image <= 16 * 16).all() and (per_image == 16 * 16).any()
    assert (per_image < 16 * 16).any()  # some squares are truncated at a border


def test_cutout_matches_the_reference_clamped_square():
    # docs/algorithms.md#dsa-operations: rows clamp(ox - hs // 2 + k, 0, H - 1), k <
    # hs; same for columns
    x = images(b=8, h=10, w=10, seed=17)
    params = sample_dsa_params(8, (10, 10), "cutout", generator=gen(18))
    p = params.ops[0][1]
    expected = x.clone()
    for b in range(8):
        ox, oy = int(p["top"][b]) + 5 // 2, int(p["left"][b]) + 5 // 2
        for k in range(5):
            for m in range(5):
                i, j = min(max(ox - 2 + k, 0), 9), min(max(oy - 2 + m, 0), 9)
                expected[b, :, i, j] = 0.0
    assert torch.equal(apply_dsa(x, params), expected)


def test_cutout_centre_range_and_hand_set_truncated_square():
    p = sample_dsa_params(3000, (32, 32), "cutout", generator=gen(19)).ops[0][1]
    centre = p["top"] + 8
    assert centre.min() == 0 and centre.max() == 32  # even side 16: [0, H] inclusive
    assert (p["bottom"] - p["top"] == 16).all() and (p["right"] - p["left"] == 16).all()
    out = apply_dsa(
        torch.ones(1, 1, 8, 8), one_op("cutout", top=[-2], bottom=[2], left=[5], right=[9])
    )
    assert out.sum() == 64 - 2 * 3
    assert (out[0, 0, :2, 5:] == 0).all()


# ---- color ----


def test_color_with_hand_set_parameters_matches_the_formulas():
    x = torch.tensor([[[[0.1, 0.4]], [[0.3, -0.2]], [[1.0, 0.5]]]])  # [1, 3, 1, 2]
    out = apply_dsa(x, one_op("color", brightness=[0.25], saturation=[1.5], contrast=[0.8]))
    values = [[0.1, 0.4], [0.3, -0.2], [1.0, 0.5]]  # [channel][pixel]
    values = [[v + 0.25 for v in ch] for ch in values]
    pixel_mean = [sum(values[c][j] for c in range(3)) / 3 for j in range(2)]
    values = [
        [(values[c][j] - pixel_mean[j]) * 1.5 + pixel_mean[j] for j in range(2)] for c in range(3)
    ]
    image_mean = sum(sum(ch) for ch in values) / 6
    values = [[(v - image_mean) * 0.8 + image_mean for v in ch] for ch in values]
    torch.testing.assert_close(out, torch.tensor(values).view(1, 3, 1, 2))


def test_color_matches_the_three_steps_per_image():
    x = images(b=5, seed=41)
    params = sample_dsa_params(5, (16, 16), "color", generator=gen(42))
    p = {k: v.view(-1, 1, 1, 1) for k, v in params.ops[0][1].items()}
    y = x + p["brightness"]
    mean = y.mean(dim=1, keepdim=True)
    y = (y - mean) * p["saturation"] + mean
    mean = y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - mean) * p["contrast"] + mean
    torch.testing.assert_close(apply_dsa(x, params), y)


def test_color_and_affine_parameters_cover_their_ranges():
    param = ParamDiffAug(aug_mode="M")
    params = sample_dsa_params(4000, (32, 32), "color_scale_rotate", generator=gen(20), param=param)
    color, scale, rotate = (p for _, p in params.ops)
    for values, low, high in [
        (color["brightness"], -0.5, 0.5),
        (color["saturation"], 0.0, 2.0),
        (color["contrast"], 0.5, 1.5),
        (scale["sx"], 1 / 1.2, 1.2),
        (scale["sy"], 1 / 1.2, 1.2),
        (rotate["angle"], -math.pi / 12, math.pi / 12),
    ]:
        span = high - low
        assert values.min() >= low and values.max() < high
        assert values.min() < low + 0.01 * span and values.max() > high - 0.01 * span


# ---- scale and rotate ----


def test_unit_scale_and_zero_rotation_are_identities():
    x = images(b=2, h=9, w=7, seed=21)
    torch.testing.assert_close(apply_dsa(x, one_op("scale", sx=[1.0, 1.0], sy=[1.0, 1.0])), x)
    torch.testing.assert_close(apply_dsa(x, one_op("rotate", angle=[0.0, 0.0])), x)


def test_scale_two_samples_every_other_pixel_with_zero_outside():
    x = images(b=1, c=2, h=5, w=5, seed=22)
    out = apply_dsa(x, one_op("scale", sx=[2.0], sy=[2.0]))  # sx > 1 zooms out
    expected = torch.zeros_like(x)
    expected[:, :, 1:4, 1:4] = x[:, :, ::2, ::2]
    torch.testing.assert_close(out, expected)


def test_quarter_turn_equals_rot90():
    x = images(b=2, h=6, w=6, seed=23)
    out = apply_dsa(x, one_op("rotate", angle=[math.pi / 2, -math.pi / 2]))
    torch.testing.assert_close(out[0], torch.rot90(x[0], 1, dims=(1, 2)))
    torch.testing.assert_close(out[1], torch.rot90(x[1], -1, dims=(1, 2)))


# ---- modes, strategies, generators ----


def test_mode_s_picks_exactly_one_op_per_call_and_all_occur():
    g = gen(24)
    seen = []
    for _ in range(120):
        params = sample_dsa_params(3, (8, 8), DSA_STRATEGY, generator=g)
        assert len(params.ops) == 1
        seen.append(params.ops[0][0])
    assert set(seen) == set(DSA_TOKENS)
    assert min(seen.count(t) for t in DSA_TOKENS) >= 8  # roughly uniform (expected 20 each)


def test_mode_m_applies_every_op_in_strategy_order():
    param = ParamDiffAug(aug_mode="M")
    params = sample_dsa_params(3, (8, 8), DSA_STRATEGY, generator=gen(25), param=param)
    assert [op for op, _ in params.ops] == list(DSA_TOKENS)
    x = images(b=3, h=8, w=8, seed=26)
    expected = x
    for op in params.ops:
        expected = apply_dsa(expected, DSAParams([op]))
    assert torch.equal(apply_dsa(x, params), expected)


@pytest.mark.parametrize("strategy", ["none", "None", ""])
def test_no_strategy_is_identity(strategy):
    x = images(seed=27)
    assert sample_dsa_params(4, (16, 16), strategy).ops == []
    assert torch.equal(dsa(x, strategy), x)


def test_same_seed_gives_same_parameters_and_none_uses_global_rng():
    a = sample_dsa_params(5, (16, 16), generator=gen(28), param=ParamDiffAug(aug_mode="M"))
    b = sample_dsa_params(5, (16, 16), generator=gen(28), param=ParamDiffAug(aug_mode="M"))
    c = sample_dsa_params(5, (16, 16), generator=gen(29), param=ParamDiffAug(aug_mode="M"))
    assert_same_params(a, b)
    assert not torch.equal(a.ops[0][1]["brightness"], c.ops[0][1]["brightness"])
    torch.manual_seed(30)
    d = sample_dsa_params(5, (16, 16), generator=None)
    torch.manual_seed(30)
    assert_same_params(d, sample_dsa_params(5, (16, 16), generator=None))


def test_bad_strategy_and_mode_are_user_errors():
    with pytest.raises(UserError, match="blur"):
        sample_dsa_params(2, (8, 8), "color_blur")
    with pytest.raises(UserError, match="aug_mode"):
        sample_dsa_params(2, (8, 8), param=ParamDiffAug(aug_mode="X"))


# ---- DC augmentation and the dispatcher ----


def test_dc_augment_shape_determinism_and_no_graph():
    x = images(b=12, seed=31).requires_grad_(True)
    out = dc_augment(x, generator=gen(32))
    assert out.shape == x.shape and not out.requires_grad
    assert torch.equal(out, dc_augment(x, generator=gen(32)))
    assert not torch.equal(out, x.detach())
    assert torch.equal(dc_augment(x, param=ParamDCAug(strategy="none")), x.detach())


def test_dc_crop_is_a_shift_in_range_filled_with_channel_means():
    x = images(b=100, h=6, w=6, seed=33)
    out = dc_augment(x, generator=gen(34), param=ParamDCAug(strategy="crop"))
    mean = x.mean(dim=(0, 2, 3)).view(-1, 1, 1)
    offsets = set()
    for b in range(100):
        padded = mean.expand(3, 14, 14).clone()  # DC: pad by crop = 4 with the channel means
        padded[:, 4:10, 4:10] = x[b]
        found = [
            (r, c)
            for r in range(9)
            for c in range(9)
            if torch.allclose(out[b], padded[:, r : r + 6, c : c + 6], atol=1e-6)
        ]
        assert len(found) == 1
        offsets.add(found[0])
    # DC draws the corner r, c each in [0, 2 * crop)
    assert {r for r, _ in offsets} == set(range(8)) and {c for _, c in offsets} == set(range(8))


def dc_reference_scale(image: torch.Tensor, h: int, w: int) -> torch.Tensor:
    # the DC codebase's scalefun for a given resized size (h, w)
    _, height, width = image.shape
    tmp = torch.nn.functional.interpolate(image[None], [h, w])[0]
    mhw = max(h, w, height, width)
    canvas = torch.zeros(image.shape[0], mhw, mhw)
    r, c = (mhw - h) // 2, (mhw - w) // 2
    canvas[:, r : r + h, c : c + w] = tmp
    r, c = (mhw - height) // 2, (mhw - width) // 2
    return canvas[:, r : r + height, c : c + width]


def test_dc_scale_matches_the_dc_resize_for_some_size_in_range():
    x = images(b=40, h=10, w=10, seed=35)
    out = dc_augment(x, generator=gen(36), param=ParamDCAug(strategy="scale"))
    sizes = set()
    for b in range(40):
        found = [
            (h, w)
            for h in range(7, 13)
            for w in range(7, 13)
            if torch.equal(out[b], dc_reference_scale(x[b], h, w))
        ]
        assert len(found) == 1
        sizes.add(found[0])
    assert {h for h, _ in sizes} == {8, 9, 10, 11}  # int(U[0.8, 1.2) * 10)


def test_dc_rotate_and_noise_keep_a_constant_image_close():
    x = torch.full((4, 3, 8, 8), 0.7)
    rotated = dc_augment(x, generator=gen(37), param=ParamDCAug(strategy="rotate"))
    torch.testing.assert_close(rotated, x)  # the fill is the mean, so nothing changes
    noisy = dc_augment(x, generator=gen(38), param=ParamDCAug(strategy="noise"))
    assert 0.0005 < (noisy - x).std() < 0.002


def test_augment_dispatches_on_dsa_flag():
    x = images(seed=38)
    assert torch.equal(augment(x, dsa=True, generator=gen(39)), dsa(x, generator=gen(39)))
    assert torch.equal(augment(x, dsa=False, generator=gen(40)), dc_augment(x, generator=gen(40)))
    assert torch.equal(augment(x, dsa=True, strategy="none"), x)
