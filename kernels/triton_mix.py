"""Triton kernels for the soft-MoME token mixing (forward + backward), any E >= 1, any d and T.

Importing this module imports triton. On CPU tensors the kernels only run under Triton's interpreter,
which is chosen when ``@triton.jit`` decorates them, i.e. when THIS module is first imported: the
environment variable ``TRITON_INTERPRET=1`` must be set before that (``TRITON_INTERPRET=1 python ...``).
``INTERPRETED`` records which mode the kernels were built in.

Kernels (x [T, d], w [E, d], y [E, T, d], gates/dlogits [T, E] fp32; last dims unit-stride):
- ``_fwd_kernel``: one program per BLOCK_T tokens. Loop 1 over d reads x once and accumulates the fp32
  logits [BLOCK_T, E]; softmax; the gates go to a [T, E] fp32 buffer saved for the backward; loop 2 over
  d reads each y[e] once and writes out. HBM traffic: x + y + out (+ w from L2, + T*E*4 bytes).
- ``_bwd_dy_kernel``: one program per BLOCK_T tokens, one loop over d: reads dout and y once, writes
  dy = g * dout and accumulates dg = <dout, y[e]>; at the end dlogits = g * (dg - <g, dg>) [T, E] fp32.
- ``_bwd_dx_dw_kernel``: grid (d blocks, token splits). Each program walks its token range once:
  dx = dlogits @ w for its tile (K = E, so plain FMAs) and dw partials = dlogits^T @ x accumulated in
  fp32 registers, written to a [splits, E, d] fp32 buffer that one small sum reduces: no atomics, no
  [E, T, d] intermediate besides dy itself.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from mks2_kernels._alloc import empty

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _fwd_kernel(
    x_ptr,  # [T, d]
    w_ptr,  # [E, d]
    y_ptr,  # [E, T, d]
    out_ptr,  # [T, d] contiguous
    g_ptr,  # [T, E] fp32 contiguous
    T,
    D,
    stride_xt,
    stride_we,
    stride_ye,
    stride_yt,
    E: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    ecol = tl.arange(0, E_PAD)  # [E_PAD]

    # Loop 1: logits [BT, E_PAD] in fp32; x is read exactly once.
    logits = tl.zeros([BLOCK_T, E_PAD], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)  # [BD]
        col_ok = cols < D
        m = row_ok[:, None] & col_ok[None, :]
        xt = tl.load(x_ptr + rows64[:, None] * stride_xt + cols[None, :], mask=m, other=0.0).to(tl.float32)
        for e in tl.static_range(E):
            we = tl.load(w_ptr + e * stride_we + cols, mask=col_ok, other=0.0).to(tl.float32)  # [BD]
            le = tl.sum(xt * we[None, :], axis=1)  # [BT]
            logits = tl.where(ecol[None, :] == e, logits + le[:, None], logits)

    # Softmax over the E real experts (padding columns get -inf -> gate 0).
    logits = tl.where(ecol[None, :] < E, logits, float("-inf"))
    mx = tl.max(logits, axis=1)  # [BT]
    p = tl.exp(logits - mx[:, None])
    gates = p / tl.sum(p, axis=1)[:, None]  # [BT, E_PAD]
    g_mask = row_ok[:, None] & (ecol[None, :] < E)
    tl.store(g_ptr + rows64[:, None] * E + ecol[None, :], gates, mask=g_mask)

    # Loop 2: out = sum_e g[:, e] * y[e]; each y[e] is read exactly once.
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        m = row_ok[:, None] & col_ok[None, :]
        acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        # Pointers advance by one expert stride per step: 64-bit pointer arithmetic, no i32 overflow of e * stride.
        y_tile = y_ptr + rows64[:, None] * stride_yt + cols[None, :]
        for e in tl.static_range(E):
            ge = tl.sum(tl.where(ecol[None, :] == e, gates, 0.0), axis=1)  # [BT]
            ye = tl.load(y_tile, mask=m, other=0.0).to(tl.float32)
            acc += ge[:, None] * ye
            y_tile += stride_ye
        tl.store(out_ptr + rows64[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bwd_dy_kernel(
    go_ptr,  # [T, d] upstream gradient
    y_ptr,  # [E, T, d]
    g_ptr,  # [T, E] fp32 gates from the forward
    dy_ptr,  # [E, T, d] contiguous
    dl_ptr,  # [T, E] fp32 dlogits (output)
    T,
    D,
    stride_got,
    stride_ye,
    stride_yt,
    stride_dye,  # T * d: dy is contiguous
    E: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    rows64 = rows.to(tl.int64)
    ecol = tl.arange(0, E_PAD)
    g_mask = row_ok[:, None] & (ecol[None, :] < E)
    gates = tl.load(g_ptr + rows64[:, None] * E + ecol[None, :], mask=g_mask, other=0.0)  # [BT, E_PAD]

    # One pass over d: dout and every y[e] read once, every dy[e] written once.
    dg = tl.zeros([BLOCK_T, E_PAD], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        m = row_ok[:, None] & col_ok[None, :]
        go = tl.load(go_ptr + rows64[:, None] * stride_got + cols[None, :], mask=m, other=0.0).to(tl.float32)
        y_tile = y_ptr + rows64[:, None] * stride_yt + cols[None, :]
        dy_tile = dy_ptr + rows64[:, None] * D + cols[None, :]
        for e in tl.static_range(E):
            ge = tl.sum(tl.where(ecol[None, :] == e, gates, 0.0), axis=1)  # [BT]
            ye = tl.load(y_tile, mask=m, other=0.0).to(tl.float32)
            dge = tl.sum(go * ye, axis=1)  # [BT]
            dg = tl.where(ecol[None, :] == e, dg + dge[:, None], dg)
            tl.store(dy_tile, (ge[:, None] * go).to(dy_ptr.dtype.element_ty), mask=m)
            y_tile += stride_ye
            dy_tile += stride_dye

    # Softmax backward, per token, in fp32.
    s = tl.sum(gates * dg, axis=1)  # [BT]
    dl = gates * (dg - s[:, None])
    tl.store(dl_ptr + rows64[:, None] * E + ecol[None, :], dl, mask=g_mask)


@triton.jit
def _bwd_dx_dw_kernel(
    x_ptr,  # [T, d]
    w_ptr,  # [E, d]
    dl_ptr,  # [T, E] fp32
    dx_ptr,  # [T, d] contiguous
    dwp_ptr,  # [splits, E, d] fp32 partial dw
    T,
    D,
    stride_xt,
    stride_we,
    tokens_per_split,
    E: tl.constexpr,
    E_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BD]
    col_ok = cols < D
    ecol = tl.arange(0, E_PAD)
    t_start = pid_s * tokens_per_split
    t_end = tl.minimum(t_start + tokens_per_split, T)

    dw_acc = tl.zeros([E_PAD, BLOCK_D], dtype=tl.float32)  # this split's share of dw[:, cols]
    for t0 in range(t_start, t_end, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < t_end
        rows64 = rows.to(tl.int64)
        m = row_ok[:, None] & col_ok[None, :]
        xt = tl.load(x_ptr + rows64[:, None] * stride_xt + cols[None, :], mask=m, other=0.0).to(tl.float32)
        dl_mask = row_ok[:, None] & (ecol[None, :] < E)
        dl = tl.load(dl_ptr + rows64[:, None] * E + ecol[None, :], mask=dl_mask, other=0.0)  # [BT, E_PAD]
        dx = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for e in tl.static_range(E):
            we = tl.load(w_ptr + e * stride_we + cols, mask=col_ok, other=0.0).to(tl.float32)  # [BD], L1 hit
            dle = tl.sum(tl.where(ecol[None, :] == e, dl, 0.0), axis=1)  # [BT]
            dx += dle[:, None] * we[None, :]
            dwe = tl.sum(dle[:, None] * xt, axis=0)  # [BD]
            dw_acc = tl.where(ecol[:, None] == e, dw_acc + dwe[None, :], dw_acc)
        tl.store(dx_ptr + rows64[:, None] * D + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=m)

    part = dwp_ptr + pid_s.to(tl.int64) * E * D
    tl.store(part + ecol[:, None] * D + cols[None, :], dw_acc, mask=(ecol[:, None] < E) & col_ok[None, :])


# ------------------------------------------------------------------------------------------------
# Launch configuration
# ------------------------------------------------------------------------------------------------


def _pow2_floor(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


# Launch-configuration overrides for tuning sweeps (kernels/tune.py): "fwd"/"dy" -> (BLOCK_T, BLOCK_D,
# num_warps), "dxdw" -> (BLOCK_T, BLOCK_D, num_warps, programs per SM). Empty in normal use.
OVERRIDE: dict[str, tuple[int, ...]] = {}


def _row_block(T: int, d: int, device: torch.device, kernel: str) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps) for the row kernels (``fwd``, ``dy``).

    The interpreter costs ~7 ms per program, so it gets few, big programs. On a GPU a program holds
    BLOCK_T tokens x BLOCK_D columns; BLOCK_T shrinks for small T so the grid still fills the SMs.
    """
    if kernel in OVERRIDE:
        return OVERRIDE[kernel]  # type: ignore[return-value]
    if device.type != "cuda":
        return 16, min(128, triton.next_power_of_2(d)), 4
    # Measured on an H100 at d=4096, T=16k, bf16 (kernels/tune.py): 2048-wide tiles with 8 warps run at
    # ~2.9 TB/s in the forward; the backward's dy kernel is best with one token per program.
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    block_d = min(2048, triton.next_power_of_2(d))
    block_t = 1 if kernel == "dy" else max(1, min(2, _pow2_floor(T // (4 * sms))))
    return block_t, block_d, 8 if block_t * block_d >= 1024 else 4


def _col_block(T: int, d: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps, splits) for the dx/dw kernel."""
    if device.type != "cuda" and "dxdw" not in OVERRIDE:
        return 16, min(64, triton.next_power_of_2(d)), 4, max(1, min(2, triton.cdiv(T, 16)))
    block_t, block_d, warps, per_sm = OVERRIDE.get("dxdw", (32, 512, 4, 4))  # tuned like the row kernels
    block_d = min(block_d, triton.next_power_of_2(d))
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    d_blocks = triton.cdiv(d, block_d)
    splits = max(1, min(triton.cdiv(T, block_t), triton.cdiv(per_sm * sms, d_blocks)))
    return block_t, block_d, warps, splits


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "mome_mix backend='triton' got CPU tensors, but the Triton kernels were compiled for a GPU: "
            "on the CPU they only run under Triton's interpreter. Set TRITON_INTERPRET=1 in the environment "
            "before the process imports triton/mks2_kernels (e.g. `TRITON_INTERPRET=1 python train.py`), or "
            "use backend='torch' (the reference) on the CPU."
        )


# ------------------------------------------------------------------------------------------------
# Launchers (inputs already validated and flattened by mks2_kernels.op; last dims unit-stride)
# ------------------------------------------------------------------------------------------------


def forward(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, d], w [E, d], y [E, T, d] -> (out [T, d] x.dtype, gates [T, E] fp32)."""
    _check_device(x)
    T, d = x.shape
    E = w.shape[0]
    out = empty((T, d), dtype=x.dtype, device=x.device)
    gates = empty((T, E), dtype=torch.float32, device=x.device)
    block_t, block_d, warps = _row_block(T, d, x.device, "fwd")
    _fwd_kernel[(triton.cdiv(T, block_t),)](
        x, w, y, out, gates, T, d, x.stride(0), w.stride(0), y.stride(0), y.stride(1),
        E=E, E_PAD=triton.next_power_of_2(E), BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    return out, gates


def backward(
    grad_out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, gates: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dx [T, d] x.dtype, dw [E, d] w.dtype, dy [E, T, d] y.dtype), see the module docstring."""
    _check_device(x)
    T, d = x.shape
    E = w.shape[0]
    e_pad = triton.next_power_of_2(E)
    dy = empty((E, T, d), dtype=y.dtype, device=y.device)
    dlogits = empty((T, E), dtype=torch.float32, device=x.device)
    block_t, block_d, warps = _row_block(T, d, x.device, "dy")
    _bwd_dy_kernel[(triton.cdiv(T, block_t),)](
        grad_out, y, gates, dy, dlogits, T, d, grad_out.stride(0), y.stride(0), y.stride(1), T * d,
        E=E, E_PAD=e_pad, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip

    block_t, block_d, warps, splits = _col_block(T, d, x.device)
    tokens_per_split = triton.cdiv(triton.cdiv(T, splits), block_t) * block_t
    splits = triton.cdiv(T, tokens_per_split)
    dx = empty((T, d), dtype=x.dtype, device=x.device)
    dw_part = empty((splits, E, d), dtype=torch.float32, device=x.device)
    _bwd_dx_dw_kernel[(triton.cdiv(d, block_d), splits)](
        x, w, dlogits, dx, dw_part, T, d, x.stride(0), w.stride(0), tokens_per_split,
        E=E, E_PAD=e_pad, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=warps,
    )  # fmt: skip
    dw = dw_part.sum(0) if splits > 1 else dw_part[0]  # [E, d] fp32, deterministic order
    return dx, dw.to(w.dtype), dy
