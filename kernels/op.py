"""``mome_mix``: the soft-MoME token mixing as a torch custom op with a fused backward.

    out = sum_e softmax(x @ W_r^T)[..., e] * Y[e]      (gates in fp32, out in x's dtype)

Public entry point ``mome_mix(x, router_weight, expert_outputs, backend="auto")`` (re-exported as
``mks2.ops.mome_mix``) with x [..., d], router_weight [E, d], expert_outputs [E, ..., d].

Registration: ``torch.ops.mks2.mome_mix_fwd`` -> (out [T, d], gates [T, E] fp32) and
``torch.ops.mks2.mome_mix_bwd`` -> (dx, dw, dy) are ``torch.library.custom_op``s with fake (meta)
implementations, and the forward op's autograd formula (``register_autograd``) calls the backward op,
so ``torch.compile`` (which traces through both as opaque nodes) and AOTAutograd use the fused kernels.
Eager calls take ``MomeMixFunction`` (a ``torch.autograd.Function`` over the same implementations),
which skips the custom-op dispatch overhead. The op is differentiable once (no double backward).

Backends: ``auto`` (CUDA tensors -> ``triton``, CPU -> ``torch``), ``triton`` (on CPU tensors only under
``TRITON_INTERPRET=1`` set before the Triton kernels are first imported), ``cuda`` (CUDA C++, JIT-built
on first use) and ``torch`` (the pure-PyTorch reference, also fp64 for gradcheck).

What is copied: leading dims are flattened with ``reshape`` (x -> [T, d], expert_outputs -> [E, T, d]),
which is free for contiguous tensors and any layout whose leading dims collapse to one stride; other
layouts (e.g. a transposed [S, B, d] view) are copied once by ``reshape``. The kernels take row and
expert strides, so they need only a unit-stride last dim; a tensor whose last dim is strided (and an
upstream gradient that is, such as the stride-0 gradient of ``out.sum()``) is made contiguous.
The router weight (E x d, tiny) is read as it is (or converted to fp32 when its dtype is neither x's
nor fp32, CUDA backend only).

ZeRO-3 (DESIGN §2): the router weight is a partitioned parameter, gathered only while its owning
module's forward runs. Call ``mome_mix`` from INSIDE that forward (``mks2.model.mome.MoMERouter`` reads
``self.weight`` in its own ``forward``), and ``deepspeed.zero.register_external_parameter`` is not needed;
read from some other module's forward, the weight would be an empty shard unless registered there.
"""

from __future__ import annotations

from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "cuda", "torch")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` if its last dim is unit-stride (rows may be strided), else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _impl(backend: str, device: torch.device) -> ModuleType:
    """The module with ``forward``/``backward`` for a resolved backend name."""
    if backend == "torch":
        from mks2_kernels import reference

        return reference
    if backend == "triton":
        from mks2_kernels import triton_mix

        return triton_mix
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"mome_mix backend='cuda' needs CUDA tensors, got tensors on {device}")
        from mks2_kernels import cuda_mix

        return cuda_mix
    raise AssertionError(f"unresolved backend {backend!r}")


def _fwd_impl(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, w, y = _unit_last(x), _unit_last(w), _unit_last(y)
    return _impl(backend, x.device).forward(x, w, y)


def _bwd_impl(grad_out, x, w, y, gates, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if grad_out.dtype != x.dtype:  # e.g. an fp32 upstream gradient for a bf16 output
        grad_out = grad_out.to(x.dtype)
    grad_out, x, w, y = _unit_last(grad_out), _unit_last(x), _unit_last(w), _unit_last(y)
    return _impl(backend, x.device).backward(grad_out, x, w, y, gates.contiguous())


class MomeMixFunction(torch.autograd.Function):
    """Eager autograd path: the same kernels as the custom op, without the custom-op dispatch overhead
    (~0.1-0.2 ms of Python per forward+backward, which matters for an op whose GPU time is ~0.5 ms).
    ``torch.compile`` goes through the custom op below instead."""

    @staticmethod
    def forward(ctx, x, w, y, backend: str):
        out, gates = _fwd_impl(x, w, y, backend)
        ctx.save_for_backward(x, w, y, gates)
        ctx.backend = backend
        ctx.mark_non_differentiable(gates)
        return out, gates

    @staticmethod
    def backward(ctx, grad_out, _grad_gates):
        x, w, y, gates = ctx.saved_tensors
        dx, dw, dy = _bwd_impl(grad_out, x, w, y, gates, ctx.backend)
        return dx, dw, dy, None


@torch.library.custom_op("mks2::mome_mix_fwd", mutates_args=())
def mome_mix_fwd(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, d], w [E, d], y [E, T, d] -> (out [T, d] in x.dtype, gates [T, E] fp32)."""
    return _fwd_impl(x, w, y, backend)


@mome_mix_fwd.register_fake
def _(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    gate_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape), x.new_empty((x.shape[0], w.shape[0]), dtype=gate_dtype)


@torch.library.custom_op("mks2::mome_mix_bwd", mutates_args=())
def mome_mix_bwd(
    grad_out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, gates: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx [T, d], dw [E, d], dy [E, T, d]) in the dtypes of x, w, y."""
    return _bwd_impl(grad_out, x, w, y, gates, backend)


@mome_mix_bwd.register_fake
def _(grad_out, x, w, y, gates, backend):
    return x.new_empty(x.shape), w.new_empty(w.shape), y.new_empty(y.shape)


def _setup_context(ctx, inputs, output) -> None:
    x, w, y, backend = inputs
    _, gates = output
    ctx.save_for_backward(x, w, y, gates)
    ctx.backend = backend
    ctx.mark_non_differentiable(gates)


def _backward(ctx, grad_out: torch.Tensor, _grad_gates: torch.Tensor | None):
    x, w, y, gates = ctx.saved_tensors
    dx, dw, dy = torch.ops.mks2.mome_mix_bwd(grad_out, x, w, y, gates, ctx.backend)
    return dx, dw, dy, None


torch.library.register_autograd("mks2::mome_mix_fwd", _backward, setup_context=_setup_context)


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``auto`` to a concrete backend for ``device``; reject unknown names."""
    backend = getattr(backend, "value", backend)  # accepts mks2.config.KernelBackend members
    if backend not in BACKENDS:
        raise ValueError(f"mome_mix: unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def _validate(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, backend: str) -> None:
    if w.dim() != 2 or x.dim() < 1:
        raise ValueError(
            f"mome_mix: want x [..., d] and router_weight [E, d], got {tuple(x.shape)} and {tuple(w.shape)}"
        )
    E, d = w.shape
    if x.shape[-1] != d:
        raise ValueError(f"mome_mix: x has d={x.shape[-1]} but router_weight is [E={E}, d={d}]")
    if E < 1:
        raise ValueError("mome_mix: router_weight has no experts (E = 0)")
    if tuple(y.shape) != (E, *x.shape):
        raise ValueError(
            f"mome_mix: expert_outputs must be [E, ..., d] = {(E, *x.shape)} for x {tuple(x.shape)} and "
            f"router_weight {tuple(w.shape)}, got {tuple(y.shape)}"
        )
    if not (x.device == w.device == y.device):
        raise ValueError(f"mome_mix: tensors on different devices: x {x.device}, w {w.device}, y {y.device}")
    if y.dtype != x.dtype:
        raise ValueError(f"mome_mix: expert_outputs dtype {y.dtype} differs from x dtype {x.dtype}")
    allowed = (*KERNEL_DTYPES, torch.float64) if backend == "torch" else KERNEL_DTYPES
    for name, t in (("x", x), ("router_weight", w)):
        if t.dtype not in allowed:
            names = ", ".join(str(a).replace("torch.", "") for a in allowed)
            raise ValueError(f"mome_mix backend={backend!r}: {name} dtype {t.dtype} not supported ({names})")


def mome_mix(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    expert_outputs: torch.Tensor,
    backend: str = "auto",
    *,
    return_gates: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mix expert outputs per token with softmax gates computed in fp32 (DESIGN §1, issue #5).

    x: [..., d] hidden states; router_weight: [E, d]; expert_outputs: [E, ..., d] (e.g.
    ``torch.stack([E0, E1])``). Returns ``sum_e softmax(x @ router_weight^T)[..., e] * expert_outputs[e]``
    with x's shape and dtype. Differentiable in all three inputs. With ``return_gates=True`` also returns
    the gates [..., E] fp32 the kernel computed (for diagnostics: not differentiable, no extra work).
    See the module docstring for the backends and what gets copied.
    """
    backend = resolve_backend(backend, x.device)
    _validate(x, router_weight, expert_outputs, backend)
    E, d = router_weight.shape
    T = x.numel() // d if d else 0
    if T == 0 or d == 0:  # nothing to launch: the differentiable reference handles empty shapes
        from mks2_kernels.reference import mix_autograd

        out = mix_autograd(x, router_weight, expert_outputs)
        gates = torch.softmax(x.detach().float() @ router_weight.detach().float().t(), dim=-1)
        return (out, gates) if return_gates else out
    x2 = x.reshape(T, d)  # [T, d], a view when the leading dims collapse
    y3 = expert_outputs.reshape(E, T, d)  # [E, T, d]
    if torch.compiler.is_compiling():  # traced: the custom op is an opaque node with a fake impl
        out, gates = torch.ops.mks2.mome_mix_fwd(x2, router_weight, y3, backend)
    elif torch.is_grad_enabled() and (x.requires_grad or router_weight.requires_grad or expert_outputs.requires_grad):
        out, gates = MomeMixFunction.apply(x2, router_weight, y3, backend)
    else:  # inference: nothing to save
        out, gates = _fwd_impl(x2, router_weight, y3, backend)
    out = out.view(x.shape)
    return (out, gates.view(*x.shape[:-1], E)) if return_gates else out
