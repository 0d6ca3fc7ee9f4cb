"""Public ops. ``mome_mix`` is the soft-MoME token mixing (DESIGN §1, issue #5).

    out = sum_e softmax(x @ W_r^T)[..., e] * Y[e]      gates per token, in fp32

``mome_mix(x, router_weight, expert_outputs, backend="auto")`` with x [..., d], router_weight [E, d]
(the MoME router's ``weight``), expert_outputs [E, ..., d] (``torch.stack([E0(u), E1(u)])``); returns
[..., d] in x's dtype, differentiable in all three. The implementation lives in ``mks2_kernels``
(folder ``kernels/``): a torch custom op (``torch.ops.mks2.mome_mix_fwd``/``_bwd``, traced by
``torch.compile``) over four backends:

- ``auto``: CUDA tensors -> ``triton``, CPU tensors -> ``torch``;
- ``triton``: fused Triton kernels. On CPU tensors they run only under Triton's interpreter, which must be
  switched on by ``TRITON_INTERPRET=1`` in the environment BEFORE the process imports triton (otherwise a
  RuntimeError says so); slow, for tests;
- ``cuda``: the same fused kernels in CUDA C++, built on first use with ``torch.utils.cpp_extension.load``
  (nvcc + ninja; cached in ``~/.cache/torch_extensions``);
- ``torch``: the pure-PyTorch reference (closed-form backward; also accepts fp64).

Any E >= 1, any d and number of tokens; fp32/fp16/bf16 (x and expert_outputs share a dtype; the router
weight may be fp32). Leading dims are flattened with ``reshape`` (a copy only for layouts that do not
collapse); tensors need a unit-stride last dim or are made contiguous (see ``mks2_kernels.op``).

ZeRO-3 rule (DESIGN §2): the router weight is a ZeRO-3-partitioned parameter that is gathered only while
its owning module's forward runs. Call ``mome_mix`` from INSIDE the forward of the module that owns the
router (the MoME layer reads ``self.router.weight`` in its own ``forward``, where DeepSpeed has
gathered it), and ``deepspeed.zero.register_external_parameter`` is not needed. Reading the weight in
some other module's forward would hand the kernel an empty partitioned shard: then register it there as
an external parameter.
"""

from __future__ import annotations

import torch
from mks2_kernels.op import BACKENDS, resolve_backend
from mks2_kernels.op import mome_mix as _mome_mix

__all__ = ["BACKENDS", "mome_mix", "resolve_backend"]


def mome_mix(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    expert_outputs: torch.Tensor,
    backend: str = "auto",
    *,
    return_gates: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mix expert outputs per token with softmax gates computed in fp32.

    x: [..., d] hidden states; router_weight: [E, d]; expert_outputs: [E, ..., d].
    Returns out [..., d] = sum_e softmax(x @ W_r^T)[..., e] * expert_outputs[e], in x's dtype.
    ``backend``: ``auto`` | ``triton`` | ``cuda`` | ``torch`` (or a ``mks2.config.KernelBackend``).
    ``return_gates=True`` returns ``(out, gates [..., E] fp32)``; the gates are the ones the kernel used,
    detached (diagnostics without recomputing them, and without saving an fp32 copy of x for autograd).
    """
    return _mome_mix(x, router_weight, expert_outputs, backend=backend, return_gates=return_gates)
