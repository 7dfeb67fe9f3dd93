"""scripts/method_figure.py draws the README's figure from mita's own routing: what it plots is what
``mita_attention`` routed (pooled-query landmarks, each query's argmax landmark, each landmark's top-k)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("method_figure", ROOT / "scripts" / "method_figure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_figure_shows_the_ops_routing():
    fig = _script()
    yy, xx = np.mgrid[0:28, 0:28] / 27.0
    img = np.clip(1 - 4 * ((xx - 0.4) ** 2 + (yy - 0.6) ** 2), 0, 1)
    r = fig.route(img)
    q, k = fig.tokens_qk(img)
    windows = r["windows"]
    assert len(windows) == 25 and sorted({t for w in windows for t in w}) == list(range(196))
    landmarks = torch.stack([q[0, 0, w].mean(0) for w in windows])  # the windows are the pooled ones
    assert np.array_equal(r["expert"], (q[0, 0] @ landmarks.T).argmax(-1).numpy())
    scores = landmarks @ k[0, 0].T
    kth = scores.topk(fig.TOPK, dim=-1).values[:, -1:]
    chosen = torch.gather(scores, 1, torch.as_tensor(r["keys"]))
    assert r["keys"].shape == (25, fig.TOPK) and bool((chosen >= kth).all())


def test_the_figure_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    fig = _script()
    out = fig.draw(fig._image(), fig.route(fig._image()), tmp_path / "method.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
