"""The paper's window-inflation ratio (helpers.studies.patching_practices.window_peak_ratio)."""

from __future__ import annotations

import pytest
import torch

from helpers.patching import LabelledTensor
from helpers.studies import patching_practices as pp


def sweeps():
    single = LabelledTensor(torch.tensor([0.0, 0.1, 0.3, 0.2, 0.4]), ("layer",))
    windows = [[0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4]]
    window = LabelledTensor(torch.tensor([0.1, 0.5, 1.2, 0.6, 0.2]), ("layer",), meta={"windows": windows})
    return window, single


def test_summed_single_layer_sweep():
    window, single = sweeps()
    summed = pp.summed_single_layer_sweep(single, window.meta["windows"])
    torch.testing.assert_close(summed, torch.tensor([0.1, 0.4, 0.6, 0.9, 0.6]))
    with pytest.raises(ValueError, match="windows must"):
        pp.summed_single_layer_sweep(single, [[3, 5]])


def test_window_peak_ratio_compares_the_two_peaks():
    window, single = sweeps()
    result = pp.window_peak_ratio(window, single)
    # the window sweep peaks at layers 1-3 (1.2); the summed sweep at layers 2-4 (0.9), another centre
    assert result.window == 3
    assert result.window_peak == pytest.approx(1.2) and result.window_peak_layers == (1, 2, 3)
    assert result.summed_peak == pytest.approx(0.9) and result.summed_peak_layers == (2, 3, 4)
    assert result.ratio == pytest.approx(1.2 / 0.9)
    # not the peak window over its own layers (1.2 / 0.6 = 2)
    assert pp.window_inflation(window, single).ratio == pytest.approx(2.0)
    excluded = pp.window_peak_ratio(window, single, exclude_layers=[4])
    assert excluded.summed_peak_layers == (1, 2, 3) and excluded.ratio == pytest.approx(2.0)
    with pytest.raises(ValueError, match="windows"):
        pp.window_peak_ratio(single, single)
    with pytest.raises(ValueError, match="every window"):
        pp.window_peak_ratio(window, single, exclude_layers=[1, 3])


def test_window_peak_ratio_below_one_when_layers_do_not_interact():
    """Additive layers: a window restores exactly the sum of its layers, so the ratio is 1; a
    sub-additive window (saturation) gives < 1."""
    single = LabelledTensor(torch.tensor([0.1, 0.2, 0.3, 0.1]), ("layer",))
    windows = [[0, 1], [0, 1, 2], [1, 2, 3], [2, 3]]
    summed = pp.summed_single_layer_sweep(single, windows)
    additive = LabelledTensor(summed.clone(), ("layer",), meta={"windows": windows})
    assert pp.window_peak_ratio(additive, single).ratio == pytest.approx(1.0)
    saturated = LabelledTensor(summed.clamp(max=0.5), ("layer",), meta={"windows": windows})
    assert pp.window_peak_ratio(saturated, single).ratio == pytest.approx(0.5 / 0.6)
