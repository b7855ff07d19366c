"""A stack of Linear layers, each with its activation, as one autograd node: `dense_stack`.

The networks here are small (widths 20-30) and a batch is ~2,000 atoms, so per-op dispatch and
autograd bookkeeping cost as much as the arithmetic: as modules, Linear + tanh is ~8 graph nodes
visited forward and backward. `dense_stack` is one node whose hand-written backward is ~3 kernels
per layer, and `dense_forward` / `dense_backward` run the same math without autograd (the
trainer's autograd-free step, with a `Workspace` that keeps the layer outputs between batches).

Layout. A layer's parameters are one block (out, cols): weight in [:, :n_in], bias in column
n_in, zeros after (`DenseLinear` in model.py owns it). Activations are stored (features, rows),
rows fastest, the layout in which MKL's small-matrix GEMM runs ~1.5x faster. On the CPU a layer
input whose width is not a multiple of 8 is stored with a ones row under it and zero rows up to
the next multiple of 8 (`block_columns`): one product `block @ [h; 1; 0]` is then W h + b, and
one product `grad @ [h; 1; 0]^T` is the whole block's gradient (weight, bias and zero padding),
at a width MKL is fast at (width 30 as 32: ~55 us instead of ~90 us at 2,000 rows).

The first layer reads the inputs x (rows, n_x) directly. A one-hot input block can be given as
class indices (`classes`): its weight columns plus the bias are then looked up per row, so the
one-hot is never built (the same function and gradients as multiplying it).

tanh on the CPU is computed as 2 sigmoid(2 z) - 1 (the same function to float rounding): torch's
CPU tanh kernel is ~6x slower than its sigmoid. Each layer stores its activation's value, so the
backward needs no extra state.
"""

from __future__ import annotations

from typing import Iterable, NamedTuple

import torch

FUSED_ACTIVATIONS = ("tanh", "sigmoid", "relu")  # derivative known from the output: applied in place

LayerSpec = tuple[torch.Tensor, int, str | None]  # block (out, cols), n_in, activation or None
_MINUS_ONE = torch.tensor(-1.0)  # a 0-dim tensor is read as a scalar without the ~2 us of wrapping a Python number


def block_columns(n_in: int, cpu: bool) -> int:
    """Columns of a layer's parameter block: n_in + 1 (weight, bias), or on the CPU, for a width that
    is not a multiple of 8, up to the next multiple of 8 (the input then carries a ones row: see
    the module docstring). Multiples of 8 are left as they are: padding them costs more."""
    return -(-(n_in + 1) // 8) * 8 if cpu and n_in % 8 else n_in + 1


class Layer(NamedTuple):
    """A Linear layer and its activation as `dense_forward` / `dense_backward` run it (`chain`)."""

    block: torch.Tensor  # (out, cols): weight in [:, :n_in], bias in column n_in, zero padding after
    n_in: int
    activation: str | None
    reads_ones: bool  # its input is stored with the ones row: a padded block after another layer
    weight_t: torch.Tensor  # block[:, :n_in].t(), the left factor of the input gradient (a view)


def chain(specs: Iterable[LayerSpec]) -> list[Layer]:
    """Consecutive layers from their (block, n_in, activation); the first reads the inputs x."""
    return [Layer(block, n_in, activation, k > 0 and n_in % 8 != 0 and block.shape[1] % 8 == 0,
                  block[:, :n_in].t()) for k, (block, n_in, activation) in enumerate(specs)]


class Workspace:
    """`dense_forward`'s layer outputs kept from call to call, for a caller that is done with a
    batch before the next one (the trainer's autograd-free step): the ones and zero rows are
    filled once, not per batch (~4 small ops per layer). Grows with the largest batch seen."""

    def __init__(self, layers: list[Layer]) -> None:
        self.layers, self.buffers = layers, []

    def take(self, n: int, like: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's output buffer for n rows."""
        if not self.buffers or self.buffers[0].shape[1] < n:
            self.buffers = _buffers(self.layers, n + n // 8, like)
        return [buffer[:, :n] for buffer in self.buffers]


def _buffers(layers: list[Layer], n: int, like: torch.Tensor) -> list[torch.Tensor]:
    """Uninitialized outputs for n rows: (out, n) per layer, or, where the next layer reads the
    ones row, as many rows as its block has columns, the ones row and zero rows filled."""
    buffers = []
    for layer, following in zip(layers, layers[1:] + [None]):
        n_out = layer.block.shape[0]
        if following is not None and following.reads_ones:
            buffer = like.new_empty(following.block.shape[1], n)
            buffer[n_out].fill_(1)
            buffer[n_out + 1:].zero_()
        else:
            buffer = like.new_empty(n_out, n)
        buffers.append(buffer)
    return buffers


def dense_stack(x: torch.Tensor, specs: list[LayerSpec], classes: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of x through each layer in turn: activation(h @ weight.T + bias), where the first
    layer's input is cat([x, one_hot(classes)]) when `classes` is given. Returns (rows, out).
    Without grad mode (evaluation) the forward pass runs without an autograd node."""
    if not torch.is_grad_enabled():
        return dense_forward(x, classes, chain(specs))[-1].t()
    spec = tuple((n_in, activation) for _, n_in, activation in specs)
    return _DenseStack.apply(x, classes, spec, *(block for block, _, _ in specs))


def _activate_(u: torch.Tensor, activation: str | None) -> torch.Tensor:
    """The activation in place on u = z (pre-activation), except for tanh on the CPU, where u = 2 z."""
    if activation == "tanh":
        return torch.add(_MINUS_ONE, u.sigmoid_(), alpha=2, out=u) if u.is_cpu else u.tanh_()
    if activation == "sigmoid":
        return u.sigmoid_()
    if activation == "relu":
        return u.relu_()
    return u


def _activation_grad(grad: torch.Tensor, value: torch.Tensor, activation: str | None) -> torch.Tensor:
    """d loss / d z from d loss / d value and the activation's stored value."""
    if activation == "tanh":
        return torch.ops.aten.tanh_backward(grad, value)
    if activation == "sigmoid":
        return torch.ops.aten.sigmoid_backward(grad, value)
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, value, 0)
    return grad


def dense_forward(x: torch.Tensor, classes: torch.Tensor | None, layers: list[Layer],
                  workspace: Workspace | None = None) -> list[torch.Tensor]:
    """`dense_stack`'s forward pass without autograd. Returns what each layer stores, (rows in the
    buffer, batch rows): its activation's value in the first `out` rows (plus the ones row and
    padding the next layer reads); the last one is the stack's output (out, rows). With a
    `workspace` the buffers are its, valid until its next use."""
    n_x, hidden = x.shape[1], x.t()
    stored = workspace.take(x.shape[0], x) if workspace is not None else _buffers(layers, x.shape[0], x)
    for k, layer in enumerate(layers):
        block, n_in = layer.block, layer.n_in
        pre = 2.0 if layer.activation == "tanh" and x.is_cpu else 1.0
        out = stored[k][:block.shape[0]]
        if k == 0 and classes is not None:  # column c of the table: one-hot column c's weights plus the bias
            table = block[:, n_x:n_in] + block[:, n_in:n_in + 1]
            torch.addmm(table.index_select(1, classes), block[:, :n_x], hidden, beta=pre, alpha=pre, out=out)
        elif layer.reads_ones:
            torch.addmm(out, block, hidden, beta=0, alpha=pre, out=out)  # beta 0: out's old contents ignored
        else:
            torch.addmm(block[:, n_in:n_in + 1], block[:, :n_in], hidden, beta=pre, alpha=pre, out=out)
        _activate_(out, layer.activation)
        hidden = stored[k]
    return stored


def dense_backward(grad: torch.Tensor, x: torch.Tensor, classes: torch.Tensor | None, layers: list[Layer],
                   stored: list[torch.Tensor], *, input_grad: bool = False, into: list[torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """`dense_stack`'s backward pass without autograd: from grad = d loss / d output (out, rows),
    the gradient of each layer's block and, with `input_grad`, of x. With `into` (tensors shaped
    like the blocks) each block's gradient is written there, overwriting it."""
    n_x, grads = x.shape[1], []
    for k in reversed(range(len(layers))):
        layer = layers[k]
        block, n_in = layer.block, layer.n_in
        grad = _activation_grad(grad, stored[k][:block.shape[0]], layer.activation)  # d loss / d z of layer k
        if layer.reads_ones:
            grads.append(torch.mm(grad, stored[k - 1].t(), out=into[k] if into else None))
        else:
            out = into[k] if into else grad.new_empty(block.shape)
            if block.shape[1] > n_in + 1:  # a padded block read as a run's first layer (after batchnorm)
                out[:, n_in + 1:].zero_()
            if k == 0 and classes is not None:
                torch.mm(grad, x, out=out[:, :n_x])
                torch.sum(_class_sums(grad, classes, n_in - n_x), 1, out=out[:, n_x:n_in])
                torch.sum(out[:, n_x:n_in], 1, out=out[:, n_in])
            else:
                torch.mm(grad, x if k == 0 else stored[k - 1].t(), out=out[:, :n_in])
                torch.sum(grad, 1, out=out[:, n_in])
            grads.append(out)
        if k > 0:
            grad = torch.mm(layer.weight_t, grad)  # d loss / d value of layer k - 1
    grad_x = torch.mm(layers[0].weight_t[:n_x], grad).t() if input_grad else None
    return grad_x, grads[::-1]


class _DenseStack(torch.autograd.Function):
    # the ctx-in-forward form: the setup_context form costs ~20 us more per call in torch 2.x
    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, classes: torch.Tensor | None,
                spec: tuple[tuple[int, str | None], ...], *blocks: torch.Tensor) -> torch.Tensor:
        stored = dense_forward(x, classes, chain((block, *layer) for block, layer in zip(blocks, spec)))
        ctx.save_for_backward(x, classes, *blocks, *stored)
        ctx.spec = spec
        return stored[-1].t()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, classes, *saved = ctx.saved_tensors
        blocks, stored = saved[:len(ctx.spec)], saved[len(ctx.spec):]
        layers = chain((block, *layer) for block, layer in zip(blocks, ctx.spec))
        grad_x, grads = dense_backward(grad.t(), x, classes, layers, stored, input_grad=ctx.needs_input_grad[0])
        return grad_x, None, None, *grads


def _class_sums(grad: torch.Tensor, classes: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Column sums of grad (features, rows) per class, as (features, 8, classes): rows cycle
    through 8 copies of the classes (sum over dim 1 to finish). Consecutive rows often share a
    class (atoms of one image), and index_add into the same column back to back is a dependency
    chain ~3x slower than spread-out adds."""
    copy = torch.arange(classes.numel(), device=classes.device).bitwise_and_(7)  # row % 8, without a division
    spread = grad.new_zeros(grad.shape[0], 8 * n_classes).index_add_(1, torch.add(classes, copy, alpha=n_classes), grad)
    return spread.view(grad.shape[0], 8, n_classes)
