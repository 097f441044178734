"""Colour fixes: AdaIN matches the reference's per-channel statistics; wavelet keeps the reference's low band."""

import pytest
import torch

from dp2osr.math.colorfix import adain, color_fix, wavelet, wavelet_decompose


def test_adain_output_has_reference_mean_and_std(rng):
    sr = torch.rand(2, 3, 32, 48, generator=rng) * 0.5
    ref = torch.rand(1, 3, 16, 24, generator=rng) * 0.3 + 0.4
    out = adain(sr, ref)
    ref_flat, out_flat = ref.flatten(2), out.flatten(2)
    for k in range(2):
        torch.testing.assert_close(out_flat[k].mean(-1), ref_flat[0].mean(-1), atol=1e-5, rtol=0)
        torch.testing.assert_close(
            out_flat[k].std(-1),
            ref_flat[0].std(-1),
            atol=1e-4,
            rtol=0,  # unbiased, as AdaIN computes it
        )


def test_adain_of_image_with_itself_is_identity(rng):
    x = torch.rand(1, 3, 20, 20, generator=rng)
    torch.testing.assert_close(adain(x, x), x, atol=1e-4, rtol=0)


def test_wavelet_decomposition_is_exact_and_low_band_taken_from_reference(rng):
    sr = torch.rand(1, 3, 40, 40, generator=rng)
    ref = torch.rand(1, 3, 40, 40, generator=rng)
    high, low = wavelet_decompose(sr)
    torch.testing.assert_close(high + low, sr, atol=1e-6, rtol=0)
    out = wavelet(sr, ref)
    # The output's low band is the reference's low band plus the low band of the SR's high bands, which the
    # à-trous filters leave small; the output minus the SR's high bands is exactly the reference's low band.
    _, ref_low = wavelet_decompose(ref)
    torch.testing.assert_close(out - high, ref_low, atol=1e-6, rtol=0)


def test_wavelet_of_constant_reference_keeps_sr_detail(rng):
    sr = torch.rand(1, 3, 32, 32, generator=rng)
    ref = torch.full((1, 3, 32, 32), 0.5)
    out = wavelet(sr, ref)
    high, _ = wavelet_decompose(sr)
    torch.testing.assert_close(out, high + 0.5, atol=1e-6, rtol=0)


def test_color_fix_rejects_unknown_method():
    with pytest.raises(ValueError, match="adain"):
        color_fix(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), "histogram")
