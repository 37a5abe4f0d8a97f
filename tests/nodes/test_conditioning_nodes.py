from __future__ import annotations

import pytest
import torch

from nodes import conditioning as c


def cond(value=1.0, tokens=77, pooled=None):
    opts = {} if pooled is None else {"pooled_output": torch.full((1, 4), pooled)}
    return [(torch.full((1, tokens, 8), value), opts)]


def test_combine_and_concat():
    (both,) = c.ConditioningCombine().execute(cond(1), cond(2))
    assert len(both) == 2
    (cat,) = c.ConditioningConcat().execute(cond(1), cond(2, tokens=154))
    assert cat[0][0].shape == (1, 231, 8) and cat[0][0][0, 100, 0] == 2


def test_average_pads_and_mixes_pooled():
    (avg,) = c.ConditioningAverage().execute(cond(1.0, 154, pooled=1.0), cond(3.0, 77, pooled=3.0), 0.25)
    t, opts = avg[0]
    assert t.shape == (1, 154, 8)
    assert t[0, 0, 0] == pytest.approx(0.25 * 1 + 0.75 * 3) and t[0, 100, 0] == pytest.approx(0.25)
    assert opts["pooled_output"][0, 0] == pytest.approx(2.5)


def test_area_mask_strength_range_options_and_inputs_untouched():
    original = cond()
    (area,) = c.ConditioningSetArea().execute(original, 256, 128, 64, 32, 1.5)
    assert area[0][1] == {"area": (16, 32, 4, 8), "strength": 1.5, "set_area_to_bounds": False}
    assert original[0][1] == {}
    (pct,) = c.ConditioningSetAreaPercentage().execute(original, 0.5, 0.25, 0.1, 0.2, 1.0)
    assert pct[0][1]["area"] == ("percentage", 0.25, 0.5, 0.2, 0.1)
    assert c.ConditioningSetAreaStrength().execute(original, 2.0)[0][0][1]["strength"] == 2.0
    (masked,) = c.ConditioningSetMask().execute(original, torch.ones(8, 8), 0.5, "mask bounds")
    assert masked[0][1]["mask"].shape == (1, 8, 8) and masked[0][1]["mask_strength"] == 0.5
    assert masked[0][1]["set_area_to_bounds"] is True
    (ranged,) = c.ConditioningSetTimestepRange().execute(original, 0.2, 0.8)
    assert ranged[0][1] == {"start_percent": 0.2, "end_percent": 0.8}


def test_zero_out():
    (zero,) = c.ConditioningZeroOut().execute(cond(5.0, pooled=2.0))
    assert zero[0][0].abs().sum() == 0 and zero[0][1]["pooled_output"].abs().sum() == 0


def test_empty_from_is_a_clear_error():
    with pytest.raises(ValueError, match="'from' conditioning is empty"):
        c.ConditioningConcat().execute(cond(), [])
