"""A stack of Linear layers, each with its activation, as one autograd node: `dense_stack`.

The networks here are small (widths 20-30) and a batch is ~2,000 atoms, so per-op dispatch and
autograd bookkeeping cost as much as the arithmetic: as modules, Linear + tanh is ~8 graph nodes
visited forward and backward. `dense_stack` is one node whose hand-written backward is ~4 kernels
per layer. Each product is computed as W h^T + b, i.e. stored (features, rows) with rows fastest,
the layout in which MKL's small-matrix GEMM runs ~1.5x faster. A one-hot input block can be given
as class indices (`classes`): its weight columns plus the bias are then looked up per row, so the
one-hot is never built (the same function and gradients as multiplying it).

tanh on the CPU: torch's CPU tanh kernel is ~6x slower than its sigmoid, so a layer stores
s = sigmoid(2 z) instead, and tanh(z) = 2 s - 1 is folded into the next layer's product
(W (2 s - 1) + b = 2 W s + (b - W 1)) and into the backward's products, so the whole activation
is one elementwise pass forward and one backward. Same function to float rounding.
"""

from __future__ import annotations

import torch

FUSED_ACTIVATIONS = ("tanh", "sigmoid", "relu")  # derivative known from the output: applied in place

Layer = tuple[torch.Tensor, torch.Tensor, str | None]  # weight (out, in), bias (out,), activation or None


def dense_stack(x: torch.Tensor, layers: list[Layer], classes: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of x through each layer in turn: activation(h @ weight.T + bias), where the first
    layer's input is cat([x, one_hot(classes)]) when `classes` is given. Returns (rows, out)."""
    activations = tuple(activation for _, _, activation in layers)
    return _DenseStack.apply(x, classes, activations, *(t for weight, bias, _ in layers for t in (weight, bias)))


def _form(activation: str | None, cpu: bool) -> tuple[float, float, float]:
    """How a layer stores its output: s = f(pre * z) with the layer's value = scale * s + shift."""
    return (2.0, 2.0, -1.0) if activation == "tanh" and cpu else (1.0, 1.0, 0.0)


def _activate_(u: torch.Tensor, activation: str | None) -> torch.Tensor:
    """f in place on u = pre * z."""
    if activation == "tanh":
        return u.sigmoid_() if u.is_cpu else u.tanh_()
    if activation == "sigmoid":
        return u.sigmoid_()
    if activation == "relu":
        return u.relu_()
    return u


def _activation_grad(grad: torch.Tensor, stored: torch.Tensor, activation: str | None) -> torch.Tensor:
    """d loss / du from d loss / ds and s = f(u)."""
    if activation == "sigmoid" or activation == "tanh" and stored.is_cpu:
        return torch.ops.aten.sigmoid_backward(grad, stored)
    if activation == "tanh":
        return torch.ops.aten.tanh_backward(grad, stored)
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, stored, 0)
    return grad


class _DenseStack(torch.autograd.Function):
    # the ctx-in-forward form: the setup_context form costs ~20 us more per call in torch 2.x
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, classes: torch.Tensor | None,
                activations: tuple[str | None, ...], *params: torch.Tensor) -> torch.Tensor:
        n_x, cpu, hidden, stored = x.shape[1], x.is_cpu, x.t(), []
        scale, shift = 1.0, 0.0  # the value of `hidden` is scale * hidden + shift
        for k, activation in enumerate(activations):
            weight, bias = params[2 * k], params[2 * k + 1]
            pre = _form(activation, cpu)[0]
            if k == 0 and classes is not None:
                table = weight[:, n_x:] + bias[:, None]  # column c: one-hot column c's weights plus the bias
                u = torch.addmm(table.index_select(1, classes), weight[:, :n_x], hidden, beta=pre, alpha=pre)
            else:
                folded = torch.add(bias, weight.sum(1), alpha=shift) if shift else bias
                u = torch.addmm(folded[:, None], weight, hidden, beta=pre, alpha=pre * scale)
            hidden = _activate_(u, activation)
            stored.append(hidden)
            scale, shift = _form(activation, cpu)[1:]
        ctx.save_for_backward(x, classes, *params, *stored)
        ctx.activations = activations
        return (hidden * scale + shift if shift or scale != 1 else hidden).t()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, classes, *saved = ctx.saved_tensors
        activations, cpu = ctx.activations, x.is_cpu
        params, stored = saved[:2 * len(activations)], saved[2 * len(activations):]
        n_x, grads, grad_x = x.shape[1], [None] * len(params), None
        pre, scale, _ = _form(activations[-1], cpu)
        grad = grad.t() if pre * scale == 1 else grad.t() * (pre * scale)
        grad = _activation_grad(grad, stored[-1], activations[-1])  # d loss / d z of the last layer
        nothing = grad.new_zeros(())
        for k in reversed(range(1, len(activations))):
            weight, (pre, scale, shift) = params[2 * k], _form(activations[k - 1], cpu)
            # the layer's input is scale * s + shift, s = stored[k - 1]
            grads[2 * k + 1] = grad.sum(1)
            grads[2 * k] = torch.addmm(grads[2 * k + 1][:, None], grad, stored[k - 1].t(), beta=shift, alpha=scale)
            grad = torch.addmm(nothing, weight.t(), grad, beta=0, alpha=scale * pre)
            grad = _activation_grad(grad, stored[k - 1], activations[k - 1])
        weight = params[0]
        if ctx.needs_input_grad[0]:
            grad_x = (weight[:, :n_x].t() @ grad).t()
        grads[0] = grad @ x
        if classes is None:
            grads[1] = grad.sum(1)
        else:
            table = _class_sums(grad, classes, weight.shape[1] - n_x)
            grads[0], grads[1] = torch.cat([grads[0], table], 1), table.sum(1)
        return grad_x, None, None, *grads


def _class_sums(grad: torch.Tensor, classes: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Column sums of grad (features, rows) per class. Rows cycle through 8 copies of the
    classes: consecutive rows often share a class (atoms of one image), and index_add into the
    same column back to back is a dependency chain ~3x slower than spread-out adds."""
    copy = torch.arange(classes.numel(), device=classes.device) % 8
    spread = grad.new_zeros(grad.shape[0], 8 * n_classes).index_add_(1, classes + n_classes * copy, grad)
    return spread.view(grad.shape[0], 8, n_classes).sum(1)
