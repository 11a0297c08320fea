"""Chunked lm_head + cross-entropy: `loss = sum_i [lse(h_i @ W^T) - (h_i @ W^T)[y_i]]` over rows with y_i != ignore.

The full logits `Z = H @ W^T` [N, V] are never built: with Llama-3's 128k vocabulary they would
take GBs in fp32. Tokens are processed in chunks of C rows; for each chunk

    z = h @ W^T                    # [C, V], in H's dtype (what F.linear does under bf16 autocast), then fp32
    lse = m + log(sum_j exp(z_j - m)),  m = max_j z_j
    loss += sum_i (lse_i - z_i[y_i])          (ignored rows contribute 0)

and, when a gradient is needed, the gradient is computed right away in the forward (the loss is a
scalar, so backward only has to scale it by d(out)/d(loss)):

    dz = softmax(z) - onehot(y)    # [C, V] fp32, zero rows for ignored labels
    dH[chunk] = dz @ W             # dz cast to W's dtype, result in H's dtype
    dW += dz^T @ h                 # [V, D], fp32 accumulator, returned in W's dtype

Only one chunk of logits (plus its fp32 copy) is alive at a time, and softmax, `dz` and the loss
are computed in place on that fp32 copy. The op returns the SUM of the losses (fp32); the caller
divides by its own token count. File layout as in `nf4_lora.py`: `linear_cross_entropy_reference`
(fp32, ground truth), the chunked autograd.Function, the public `linear_cross_entropy`, and
`linear_cross_entropy_workspace_bytes` for the memory estimator.

backend="triton" (opt-in; CUDA, or CPU under TRITON_INTERPRET=1) replaces the per-chunk softmax
with `qtrain.kernels.cross_entropy`'s kernel: the chunk's logits stay in H's dtype (no fp32 copy)
and are turned into `dz` in place, in that dtype, by one kernel (fp32 math per vocab block). dH
then uses that `dz` directly (the torch path rounds its fp32 `dz` to W's dtype too); dW, when
needed, multiplies an fp32 copy of the rounded `dz`. The default, backend="torch", is the PyTorch
code above, unchanged.

Soft-capping (Gemma-2's `final_logit_softcapping`): with `softcap=c` the loss is taken on
`c * tanh(z / c)`, as the model's own forward does; the torch path caps each chunk's fp32 copy in
place and keeps `1 - tanh^2` (one more fp32 [C, V]) to carry dz back through the cap. The Triton
backend has no cap: with a softcap the op runs the torch path.

Shapes: H [N, D] (or [B, S, D]), W [V, D], labels [N] (or [B, S]) int64.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from qtrain.kernels import backend as policy
from qtrain.kernels.backend import BACKENDS  # noqa: F401 - re-exported


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100, softcap: float | None = None
) -> torch.Tensor:
    """Ground truth in fp32: full logits (soft-capped when `softcap`), then the summed cross-entropy
    over non-ignored labels."""
    logits = soft_cap(hidden.float() @ weight.float().T, softcap)  # [N, V]
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


def soft_cap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """`cap * tanh(logits / cap)` (Gemma-2's final logit soft-capping, as transformers computes it);
    `logits` unchanged when `cap` is None."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


MIN_CHUNK_ROWS = 256  # below this, every chunk's reading of the whole [V, D] lm_head costs more than it saves


def default_chunk_size(n_tokens: int, vocab: int, hidden_size: int) -> int:
    """Tokens per chunk: at least 256 rows, more when the logits stay about H's size; at most N.

    Each chunk reads all of W [V, D] twice (logits, dH), so small chunks are slow: at D=512, V=32000
    on one CPU thread a [C, D] x [D, V] product costs about the same ~17 ms from C=16 to C=32
    (reading W), 0.45 ms a row from C=64 on (arithmetic). So C = 256 rows, or Liger-Kernel's
    next_power_of_2(ceil(N / ceil(V / D))) when that is larger, which keeps the logits about H's
    size at long sequences (Llama-3 8B, V=128256, D=4096: N=8192 gives 256, N=65536 gives 2048);
    then at most N. Measured on the model of benchmarks/cpu.py (fp32, forward + backward of the
    loss): N=2048: 256 rows 1.63 s, 64 rows (the Liger rule alone) 1.83 s, full logits 2.03 s;
    N=256: 256 rows 209 ms, 128 rows 241 ms, 64 rows 294 ms; N=64: 64 rows 68 ms, 32 rows 83 ms,
    2 rows (the Liger rule alone) 551 ms. A whole training step follows: at 2 x 128 tokens, 128-row
    chunks would hold half the logits (step memory 0.20x of full logits' instead of 0.37x) but
    train at 0.96x of transformers + PEFT's speed instead of 1.10x (benchmarks/cpu.py).
    """
    liger = 1 << (max(1, math.ceil(n_tokens / math.ceil(vocab / hidden_size))) - 1).bit_length()
    return max(1, min(n_tokens, max(MIN_CHUNK_ROWS, liger)))


def _chunk_loss_(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, grad: bool, softcap: float | None = None
) -> torch.Tensor:
    """Summed loss of one chunk; with `grad`, turns `logits` [C, V] fp32 IN PLACE into dlogits.
    `softcap`: the loss of `c * tanh(z / c)`, and dlogits through the cap's derivative `1 - tanh^2`."""
    slope = None
    if softcap is not None:
        tanh = logits.div_(softcap).tanh_()  # [C, V], in place
        slope = tanh.square().neg_().add_(1) if grad else None  # d(capped)/dz = 1 - tanh^2: one more fp32 [C, V]
        logits = tanh.mul_(softcap)
    valid = labels != ignore_index  # [C]
    target = labels.where(valid, 0)[:, None]  # [C, 1], ignored rows point at class 0
    target_logit = logits.gather(1, target).squeeze(1)  # [C]
    row_max = logits.amax(dim=1, keepdim=True)  # [C, 1]
    exp = logits.sub_(row_max).exp_()  # [C, V], in place
    sum_exp = exp.sum(dim=1, keepdim=True)  # [C, 1]
    lse = (sum_exp.log() + row_max).squeeze(1)  # [C]
    loss = torch.where(valid, lse - target_logit, 0.0).sum()
    if grad:  # softmax - onehot, zero for ignored rows
        row_scale = valid[:, None] / sum_exp  # [C, 1]
        exp.mul_(row_scale).scatter_add_(1, target, -valid[:, None].to(exp.dtype))
        if slope is not None:
            exp.mul_(slope)
    return loss


def _chunk_loss_triton_(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, grad: bool) -> torch.Tensor:
    """`_chunk_loss_` with the Triton kernel: `logits` [C, V] in any float dtype, dlogits in place in it."""
    from qtrain.kernels.cross_entropy import cross_entropy_forward, cross_entropy_fwd_bwd  # lazy: imports triton

    if grad:
        return cross_entropy_fwd_bwd(logits, labels, ignore_index)[0]
    return cross_entropy_forward(logits, labels, ignore_index)


def _chunked_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int,
    ignore_index: int,
    grad_hidden: bool,
    grad_weight: bool,
    backend: str = "torch",
    softcap: float | None = None,
):
    """(loss, dH or None, dW or None): the loop over token chunks, in hidden's dtype + fp32.

    Rows whose label is `ignore_index` (prompt tokens in SFT, padding) add nothing to the loss and get
    a zero gradient, so their logits are never computed: when there are any, the chunks gather the
    labelled rows only (`chunk_size` labelled rows each) and dH is zero elsewhere.
    backend "torch" or "triton" (already resolved): who computes each chunk's loss and dlogits;
    `softcap`: the logits' soft cap (torch backend only)."""
    n, d = hidden.shape
    rows = _labelled_rows(labels, ignore_index)  # None: every row is labelled
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    g_hidden = None
    if grad_hidden:  # [N, D]; rows without a label keep a zero gradient
        alloc = torch.empty if rows is None else torch.zeros
        g_hidden = alloc(n, d, dtype=hidden.dtype, device=hidden.device)
    g_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if grad_weight else None  # [V, D]
    for start in range(0, n if rows is None else rows.numel(), chunk_size):
        take = slice(start, start + chunk_size) if rows is None else rows[start : start + chunk_size]
        h, y = hidden[take], labels[take]  # [C, D], [C]: views, or gathered labelled rows
        if backend == "triton":
            logits = h @ weight.T  # [C, V] in hidden's dtype, becomes dlogits in that dtype
            loss += _chunk_loss_triton_(logits, y, ignore_index, grad_hidden or grad_weight)
        else:
            logits = (h @ weight.T).float()  # [C, V]: in hidden's dtype, then an fp32 copy (none for fp32)
            loss += _chunk_loss_(logits, y, ignore_index, grad_hidden or grad_weight, softcap)
        if g_hidden is not None and rows is None:
            torch.mm(logits.to(weight.dtype), weight, out=g_hidden[take])  # [C, D]
        elif g_hidden is not None:
            g_hidden.index_copy_(0, take, logits.to(weight.dtype) @ weight)  # [C, D] into the labelled rows
        if g_weight is not None:  # .float(): no-op for fp32 (torch path); a copy of 16-bit dlogits (triton path)
            g_weight.addmm_(logits.T.float(), h.float())  # [V, D] += [V, C] @ [C, D], fp32
        del logits  # free this chunk's [C, V] before the next one is allocated
    if g_weight is not None:
        g_weight = g_weight.to(weight.dtype)
    return loss, g_hidden, g_weight


def _labelled_rows(labels: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Indices of the rows that have a label [n_labelled], or None when every row has one."""
    valid = labels != ignore_index
    return None if bool(valid.all()) else valid.nonzero().squeeze(1)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight^T`, chunked over tokens, gradients computed in forward.

    Saves only dH [N, D] (and dW [V, D] when weight needs a gradient); backward scales them by the
    incoming scalar gradient. Called with autocast disabled and hidden.dtype == weight.dtype (see
    `linear_cross_entropy`).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size: int, ignore_index: int, backend: str = "torch", softcap=None):
        need_h, need_w = ctx.needs_input_grad[:2]
        loss, g_hidden, g_weight = _chunked_forward(
            hidden, weight, labels, chunk_size, ignore_index, need_h, need_w, backend, softcap
        )
        ctx.save_for_backward(g_hidden, g_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        g_hidden, g_weight = ctx.saved_tensors
        # out of place (one more [N, D] for a moment) so that retain_graph=True stays correct
        g_hidden = None if g_hidden is None else g_hidden * grad_loss
        g_weight = None if g_weight is None else g_weight * grad_loss
        return g_hidden, g_weight, None, None, None, None, None


def resolve_backend(backend: str, hidden: torch.Tensor) -> str:
    """The concrete backend ("torch" or "triton") that `backend` means for `hidden`, by the one policy
    of `qtrain.kernels.backend`: "auto" takes triton on CUDA sm_80+ with triton >= its floor once the
    cross-entropy kernel passed its self-check there (`qtrain.kernels.cross_entropy.triton_self_check`)."""
    return policy.resolve_backend("linear_cross_entropy", backend, hidden)


def _check_inputs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size) -> None:
    if hidden.dim() < 2 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden {tuple(hidden.shape)} must be [..., D] and weight "
            f"{tuple(weight.shape)} [V, D] with the same D"
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"linear_cross_entropy: labels {tuple(labels.shape)} must have hidden's leading shape "
            f"{tuple(hidden.shape[:-1])} (hidden is {tuple(hidden.shape)})"
        )
    if labels.dtype != torch.int64:
        raise ValueError(f"linear_cross_entropy: labels must be int64 (torch.long), got {labels.dtype}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 0):
        raise ValueError(f"linear_cross_entropy: chunk_size must be None or an int >= 0, got {chunk_size!r}")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    backend: str = "torch",
    softcap: float | None = None,
) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight^T` against `labels` (fp32 scalar), chunked over tokens.

    hidden [N, D] or [B, S, D], weight [V, D], labels [N] or [B, S] int64. chunk_size: tokens per
    chunk; None -> `default_chunk_size`; 0 -> the unchunked path (full logits, for comparison).
    backend: who computes each chunk's softmax/loss/dlogits: "torch" (default, fp32 copy of the
    chunk), "triton" (the in-place kernel of `qtrain.kernels.cross_entropy`, no fp32 copy; CUDA, or
    CPU under TRITON_INTERPRET=1), "auto" (triton on CUDA when it passes its self-check, else
    torch). The unchunked path (chunk_size=0) ignores it. softcap: the loss of `softcap *
    tanh(logits / softcap)` (Gemma-2), on every path; a softcap makes "triton"/"auto" run torch.

    Autocast: inside `torch.autocast(device_type, dtype)` both hidden and weight are cast to the
    autocast dtype, as F.linear would do (a no-op for bf16 inputs under bf16 autocast), and the op
    then runs with autocast disabled, so every step uses the dtype chosen explicitly above: logits
    in hidden's dtype, softmax/loss in fp32. (custom_fwd needs a fixed device_type; this works on
    any device.) Outside autocast, hidden and weight must have the same dtype, as for F.linear.
    """
    _check_inputs(hidden, weight, labels, chunk_size)
    backend = "torch" if softcap is not None else resolve_backend(backend, hidden)
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)  # [N, D], [N]
    device_type = hidden.device.type
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    if autocast:
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    if hidden.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: hidden is {hidden.dtype} but weight is {weight.dtype}")
    if chunk_size == 0:
        logits = soft_cap(F.linear(hidden, weight).float(), softcap)
        return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.shape[0], weight.shape[0], hidden.shape[1])
    with torch.autocast(device_type, enabled=False) if autocast else contextlib.nullcontext():
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return LinearCrossEntropyFunction.apply(hidden, weight, labels, chunk_size, ignore_index, backend, softcap)
        return _chunked_forward(hidden, weight, labels, chunk_size, ignore_index, False, False, backend, softcap)[0]  # no dH/dW


ROW_BYTES = 40  # per-row vectors of a chunk (mask, targets, target logits, max, sum, lse, ...): ~33-37 B measured


def linear_cross_entropy_workspace_bytes(
    n_tokens: int,
    vocab: int,
    hidden_size: int,
    chunk_size: int | None,
    dtype: torch.dtype,
    needs_grad: bool = True,
    weight_grad: bool = False,
    backend: str = "torch",
    softcap: bool = False,
) -> int:
    """Peak bytes the op allocates beyond its inputs (forward + backward), from the code above.

    N tokens, V vocab, D hidden, s = dtype's itemsize, f = s for 16-bit dtypes and 0 for fp32 (the
    fp32 "copy" of fp32 logits is the same tensor), C = min(chunk_size, N) (None: the default).
    `needs_grad`: hidden gets a gradient; `weight_grad`: weight gets one too.

        chunk  = C*V*(f + 4) + 40*C    logits in dtype + their fp32 copy, later dlogits fp32 + its
                                       dtype copy for dH (never more than two [C, V] at once)
               + 9*N + k*C*D*s         with ignored labels: the labelled rows' indices (and the mask
                                       they come from), the chunk's gathered rows of H (k=1), and
                                       with dH their gradient before it is scattered (k=2)
        no gradient:        chunk
        dH only (gH = N*D*s): max(gH + chunk, 2*gH)    forward; backward returns gH * grad (one more)
        dW too:  max(gH + V*D*4 + max(chunk, C*V*4 + C*D*f),   fp32 dW accumulator, h.float() for addmm
                     gH + V*D*(4 + f),                          dW cast to dtype at the end of forward
                     2*(gH + V*D*s))                            backward
        chunk_size=0 (unchunked F.cross_entropy on full logits): 12*N*V with a gradient (autograd holds
                     the saved log-probs, their grad from nll_loss and the log_softmax grad, all fp32
                     [N, V]), 8*N*V without (fp32 logits + log-probs).

    backend="triton" (resolved; "auto" is not accepted here): the chunk's logits stay in dtype and
    become dlogits in place, so chunk = C*V*s + 40*C (no fp32 copy); dH only: max(gH + chunk, 2*gH);
    dW too: the forward term becomes gH + V*D*4 + chunk + C*V*4*[f > 0] + C*D*f (an fp32 copy of
    16-bit dlogits and h.float() for addmm), the cast and backward terms stay as above.

    `softcap` (a soft-capped head: the torch path whatever `backend` says): with a gradient, the
    chunk also holds the cap's slope, C*V*4 more.

    Not counted: the scalar loss and BLAS scratch. cuBLAS's workspace is allocated once per handle;
    on CPU, oneDNN's bf16 matmul packs W for `dz @ W`, up to another V*D*s per chunk (measured: 2x
    the formula at N=512, D=64, V=4096, C=8; fp32 and fp16 on CPU match it to within 0.5%).
    """
    if backend not in ("torch", "triton"):
        raise ValueError(f"linear_cross_entropy_workspace_bytes: backend must be 'torch' or 'triton', got {backend!r}")
    n, v, d, s = n_tokens, vocab, hidden_size, dtype.itemsize
    if chunk_size == 0:
        return (12 if needs_grad or weight_grad else 8) * n * v
    c = min(n, default_chunk_size(n, v, d) if chunk_size is None else chunk_size)
    f = 0 if dtype == torch.float32 else s
    backend = "torch" if softcap else backend
    if backend == "triton":
        chunk = c * v * s + ROW_BYTES * c
    else:
        chunk = c * v * (f + 4 + (4 if softcap and (needs_grad or weight_grad) else 0)) + ROW_BYTES * c
    chunk += 9 * n + (2 if needs_grad else 1) * c * d * s  # labelled rows gathered (an upper bound: none if all are)
    if not (needs_grad or weight_grad):
        return chunk
    g_hidden = n * d * s if needs_grad else 0
    if not weight_grad:
        return max(g_hidden + chunk, 2 * g_hidden)
    if backend == "triton":
        forward = g_hidden + v * d * 4 + chunk + c * v * (0 if f == 0 else 4) + c * d * f
    else:
        forward = g_hidden + v * d * 4 + max(chunk, c * v * 4 + c * d * f)
    return max(forward, g_hidden + v * d * (4 + f), 2 * (g_hidden + v * d * s))
