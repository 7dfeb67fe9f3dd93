"""GPU checks of the modules (skipped without CUDA): the default backend agrees with the torch backend."""

from __future__ import annotations

import pytest
import torch

from mita.models import SequenceClassifier, vit_fmnist
from mita.nn import MiTAAttention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("layout", ["grid", "seq"])
def test_auto_backend_matches_torch_backend_on_cuda(layout):
    torch.manual_seed(0)
    kw = dict(num_landmarks=16, topk=16, layout=layout, prefix_tokens=1)
    auto = MiTAAttention(64, 4, **kw).cuda()
    ref = MiTAAttention(64, 4, backend="torch", **kw).cuda()
    ref.load_state_dict(auto.state_dict())
    x = torch.randn(2, 257, 64, device="cuda", requires_grad=True)
    mask = None
    if layout == "seq":
        mask = torch.zeros(2, 257, dtype=torch.bool, device="cuda")
        mask[1, 200:] = True
    out = auto(x, key_padding_mask=mask)
    torch.testing.assert_close(out, ref(x, key_padding_mask=mask), rtol=1e-4, atol=1e-4)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_models_train_step_on_cuda_with_bf16_autocast():
    torch.manual_seed(1)
    for model, inputs in (
        (vit_fmnist(embed_dim=64, depth=2).cuda(), torch.randn(8, 1, 28, 28, device="cuda")),
        (SequenceClassifier(20, 3, 4096, dim=64).cuda(), torch.randint(1, 20, (2, 4096), device="cuda")),
    ):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(inputs).float().logsumexp(-1).mean()
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
