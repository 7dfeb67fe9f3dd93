"""One C++ forward/backward pair as a differentiable call, in eager mode and under ``torch.compile``.

Under ``torch.compile`` the pair runs as its ``torch.library.custom_op`` (fake implementation and
registered autograd). In eager mode the same C++ ops are called through a plain ``autograd.Function``:
a Python custom op imports ``torch._dynamo`` on its first call, 150 MB of resident memory that full
attention does not pay.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def eager_or_compiled(
    custom_op: Callable,
    namespace: str,
    forward: str,
    backward: str,
    setup_context: Callable,
    backward_fn: Callable,
    non_differentiable: tuple[int, ...],
) -> Callable:
    """The call for ``custom_op``, whose eager twin runs ``torch.ops.<namespace>.<forward>`` and, for its
    backward, ``backward_fn(ctx, *grads, bwd=torch.ops.<namespace>.<backward>)``; the outputs at
    ``non_differentiable`` are marked so. The ops are looked up at call time (the library is built and
    loaded on first use)."""

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = getattr(getattr(torch.ops, namespace), forward)(*inputs)
            ctx.mark_non_differentiable(*(output[i] for i in non_differentiable))
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            if torch.is_grad_enabled():  # create_graph=True: the C++ backward is not differentiable
                raise RuntimeError(
                    "mita: the cpu backend's backward is not differentiable (second-order gradients, "
                    "gradgradcheck, Hessian-vector products); use backend='torch' or 'reference' for those"
                )
            return backward_fn(ctx, *grads, bwd=getattr(getattr(torch.ops, namespace), backward))

    Eager.__name__ = Eager.__qualname__ = f"Eager_{namespace}_{forward}"

    def call(*inputs):
        if torch.compiler.is_compiling():
            return custom_op(*inputs)
        return Eager.apply(*inputs)

    return call


def fake_attention_outputs(
    q: torch.Tensor, v: torch.Tensor, expert_index: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shapes of an attention kernel's outputs for ``torch.compile``'s fake tensors: out [B, H, N, dv], its
    log-sum-exp [B, H, N] and the routing argmax [B, H, N, 1] (empty when the experts were given)."""
    b, h, n, _ = q.shape
    routing = q.new_empty(0 if expert_index is not None else b, h, n, 1, dtype=torch.long)
    return q.new_empty(b, h, n, v.shape[-1]), q.new_empty(b, h, n), routing
