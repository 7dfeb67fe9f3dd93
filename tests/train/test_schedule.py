"""Warm-up + cosine schedule: values against the formula written out, state round trip, bad input."""

import math

import pytest
import torch

from mita.train.schedule import WarmupCosine, warmup_cosine


def test_values_match_formula():
    sched = WarmupCosine(total=110, warmup=10, min_ratio=0.1)
    for step in range(10):
        assert sched(step) == pytest.approx((step + 1) / 11)
    for step in range(10, 111):
        t = (step - 10) / 100
        assert sched(step) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    assert sched(10) == pytest.approx(1.0)  # peak right after warm-up
    assert sched(60) == pytest.approx(0.55)  # half-way down the cosine
    assert sched(500) == pytest.approx(0.1)  # flat after the end


def test_lambda_lr_drives_optimizer_and_restores():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = warmup_cosine(opt, total=20, warmup=4)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([2.0 * (s + 1) / 5 for s in range(4)])
    state = sched.state_dict()
    opt2 = torch.optim.SGD([p], lr=2.0)
    sched2 = warmup_cosine(opt2, total=20, warmup=4)
    sched2.load_state_dict(state)
    assert sched2.last_epoch == 7
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * WarmupCosine(20, 4)(7))


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"total": 0, "warmup": 0}, "total"),
        ({"total": 5, "warmup": 6}, "warm-up"),
        ({"total": 5, "warmup": 1, "min_ratio": 2.0}, "min_ratio"),
    ],
)
def test_bad_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        WarmupCosine(**kw)
