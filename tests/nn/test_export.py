"""Graph capture of every attention kind: ``torch.jit.trace`` and ``torch.export`` work (and match eager on
a new input); ``torch.jit.script`` is not supported, as documented on :class:`mita.nn.base.AttentionBase`."""

from __future__ import annotations

import warnings

import pytest
import torch

from mita.nn import ATTENTION_KINDS, build_attention

_KW = {
    "mita": dict(num_landmarks=4, topk=5),
    "agent": dict(num_landmarks=4),
    "moba": dict(block_size=4),
    "topk": dict(topk=5),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_trace_and_export_work_script_does_not(kind):
    torch.manual_seed(0)
    mod = build_attention(kind, 16, 2, **_KW.get(kind, {})).double().eval()
    x, new = torch.randn(2, 17, 16, dtype=torch.float64), torch.randn(2, 17, 16, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(mod, (x,), check_trace=False)
    torch.testing.assert_close(traced(new), mod(new), rtol=1e-12, atol=1e-12)
    exported = torch.export.export(mod, (x,)).module()
    torch.testing.assert_close(exported(new), mod(new), rtol=1e-12, atol=1e-12)
    with pytest.raises(torch.jit.frontend.NotSupportedError):
        torch.jit.script(mod)
