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


def _padded_rows(n: int) -> int:
    """Rows to store a CPU layer's n outputs in: up to a multiple of 8, when that leaves room,
    with a row of ones after them. The next layer's weight gradient (grad @ s^T, whose long sum is
    over rows) then runs at a width MKL's small-matrix GEMM is fast at (width 30 as 32: ~55 us
    instead of ~90 us at 2,000 rows) and gives the bias gradient in the same product. Widths
    that are multiples of 8 are left as they are (padding them to the next one costs more)."""
    return -(-n // 8) * 8 if n % 8 else n


def dense_forward(x: torch.Tensor, classes: torch.Tensor | None, activations: tuple[str | None, ...],
                  params: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    """`dense_stack`'s forward pass without autograd. params: weight, bias of each layer in turn.
    Returns what each layer stores, s (features, rows), whose value is scale * s + shift (`_form`);
    `dense_value` gives the last layer's value, `dense_backward` takes them all."""
    n_x, cpu, hidden, stored = x.shape[1], x.is_cpu, x.t(), []
    scale, shift = 1.0, 0.0  # the value of `hidden` is scale * hidden + shift
    for k, activation in enumerate(activations):
        weight, bias = params[2 * k], params[2 * k + 1]
        pre, n_out = _form(activation, cpu)[0], weight.shape[0]
        padded = _padded_rows(n_out) if cpu and k + 1 < len(activations) else n_out
        buffer = hidden.new_empty(padded, hidden.shape[1])
        if padded > n_out:  # a ones row, then zeros: see _padded_rows
            buffer[n_out + 1:].zero_()
            buffer[n_out].fill_(1)
        if k == 0 and classes is not None:
            table = weight[:, n_x:] + bias[:, None]  # column c: one-hot column c's weights plus the bias
            u = torch.addmm(table.index_select(1, classes), weight[:, :n_x], hidden, beta=pre, alpha=pre,
                            out=buffer[:n_out])
        else:
            folded = torch.add(bias, weight.sum(1), alpha=shift) if shift else bias
            u = torch.addmm(folded[:, None], weight, hidden, beta=pre, alpha=pre * scale, out=buffer[:n_out])
        hidden = _activate_(u, activation)
        stored.append(buffer)
        scale, shift = _form(activation, cpu)[1:]
    return stored


def dense_value(stored: list[torch.Tensor], activations: tuple[str | None, ...]) -> torch.Tensor:
    """The stack's output (out, rows) from `dense_forward`'s stored outputs."""
    _, scale, shift = _form(activations[-1], stored[-1].is_cpu)
    return stored[-1] * scale + shift if shift or scale != 1 else stored[-1]


def dense_backward(grad: torch.Tensor, x: torch.Tensor, classes: torch.Tensor | None,
                   activations: tuple[str | None, ...], params: tuple[torch.Tensor, ...], stored: list[torch.Tensor],
                   *, input_grad: bool = False, into: list[torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """`dense_stack`'s backward pass without autograd: from grad = d loss / d output (out, rows),
    the gradients of the parameters (in params' order) and, with `input_grad`, of x. With `into`
    (tensors shaped like params) each parameter gradient is written there, overwriting it."""
    cpu, n_x = x.is_cpu, x.shape[1]
    grads: list[torch.Tensor | None] = [None] * len(params)
    out = into if into is not None else grads
    pre, scale, _ = _form(activations[-1], cpu)
    grad = grad if pre * scale == 1 else grad * (pre * scale)
    grad = _activation_grad(grad, stored[-1], activations[-1])  # d loss / d z of the last layer
    nothing = grad.new_zeros(())
    for k in reversed(range(1, len(activations))):
        weight, (pre, scale, shift) = params[2 * k], _form(activations[k - 1], cpu)
        n_in, padded = weight.shape[1], stored[k - 1]
        s = padded[:n_in]  # the layer's input is scale * s + shift
        if padded.shape[0] > n_in:  # s, then a ones row: one product gives both gradients
            both = grad @ padded.t()
            grads[2 * k + 1] = both[:, n_in] if into is None else into[2 * k + 1].copy_(both[:, n_in])
            grads[2 * k] = torch.add(both[:, :n_in] * scale if scale != 1 else both[:, :n_in], both[:, n_in:n_in + 1],
                                     alpha=shift, out=out[2 * k] if into else None)
        else:
            grads[2 * k + 1] = torch.sum(grad, 1, out=out[2 * k + 1] if into else None)
            grads[2 * k] = torch.addmm(grads[2 * k + 1][:, None], grad, s.t(), beta=shift, alpha=scale,
                                       out=out[2 * k] if into else None)
        grad = torch.addmm(nothing, weight.t(), grad, beta=0, alpha=scale * pre)
        grad = _activation_grad(grad, s, activations[k - 1])
    weight = params[0]
    grad_x = (weight[:, :n_x].t() @ grad).t() if input_grad else None
    if classes is None:
        grads[0] = torch.mm(grad, x, out=out[0] if into else None)
        grads[1] = torch.sum(grad, 1, out=out[1] if into else None)
    else:
        table = _class_sums(grad, classes, weight.shape[1] - n_x)
        grads[0] = torch.cat([grad @ x, table], 1, out=out[0] if into else None)
        grads[1] = torch.sum(table, 1, out=out[1] if into else None)
    return grad_x, grads


class _DenseStack(torch.autograd.Function):
    # the ctx-in-forward form: the setup_context form costs ~20 us more per call in torch 2.x
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, classes: torch.Tensor | None,
                activations: tuple[str | None, ...], *params: torch.Tensor) -> torch.Tensor:
        stored = dense_forward(x, classes, activations, params)
        ctx.save_for_backward(x, classes, *params, *stored)
        ctx.activations = activations
        return dense_value(stored, activations).t()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, classes, *saved = ctx.saved_tensors
        n_params = 2 * len(ctx.activations)
        grad_x, grads = dense_backward(grad.t(), x, classes, ctx.activations, tuple(saved[:n_params]),
                                       saved[n_params:], input_grad=ctx.needs_input_grad[0])
        return grad_x, None, None, *grads


def _class_sums(grad: torch.Tensor, classes: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Column sums of grad (features, rows) per class. Rows cycle through 8 copies of the
    classes: consecutive rows often share a class (atoms of one image), and index_add into the
    same column back to back is a dependency chain ~3x slower than spread-out adds."""
    copy = torch.arange(classes.numel(), device=classes.device) % 8
    spread = grad.new_zeros(grad.shape[0], 8 * n_classes).index_add_(1, classes + n_classes * copy, grad)
    return spread.view(grad.shape[0], 8, n_classes).sum(1)
