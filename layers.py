"""Transformer building blocks shared by the DiT (model.py) and the text connector (text.py):
RMSNorm, the split rotary embedding, gated multi-head attention and the GELU feed-forward.

Module and parameter names follow the official LTX-2 checkpoint (`to_q`, `q_norm`, `to_out.0`,
`net.0.proj`, `net.2`), so the modules built from these load its weights as they are. A component:
imports nothing of the repository.
"""

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x, eps=1e-6):
    """Parameter-free RMSNorm over the last dim, in x's dtype (as the reference's `rms_norm`)."""
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


class RMSNorm(nn.Module):
    """RMSNorm with a learnable per-channel `weight` (the attention q_norm / k_norm)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


# The progress coordinate of tokens outside an utterance's spoken words or generated span (a text
# prompt's description, registers, padding, reference audio), for the DiT's optional progress rope:
# outside the 0..1 the spoken tokens span, so no head mistakes them for a place in the words.
PROGRESS_OUTSIDE = -1.0


@functools.lru_cache(maxsize=16)
def _rope_grid(theta, n, double_precision):
    """The n rotary frequencies `theta**linspace(0, 1, n) * pi/2` as a CPU fp32 tensor.

    With `double_precision` (config `frequencies_precision: float64`) the grid is computed with
    numpy in float64 and then rounded to fp32, exactly as the reference's `generate_freq_grid_np`.
    """
    if double_precision:
        grid = np.power(theta, np.linspace(0.0, 1.0, n, dtype=np.float64)) * math.pi / 2
        return torch.from_numpy(grid).to(torch.float32)
    return (theta ** torch.linspace(0.0, 1.0, n, dtype=torch.float32)) * math.pi / 2


def split_rope(positions, max_pos, inner_dim, heads, theta=1e4, dtype=torch.float32, double_precision=True):
    """cos/sin tables of the "split" rotary embedding for `apply_rope`.

    positions: (B, T) raw coordinates (seconds for audio, token index for the text connector), or
        (B, T, n_axes) for several axes with `max_pos` a sequence of n_axes (the video stream).
    Each coordinate is mapped to `2 * pos / max_pos - 1` and multiplied by the frequency grid;
    with several axes the frequencies interleave the axes and the first channels that do not
    divide evenly are left unrotated (cos 1, sin 0), as in the reference.
    Returns (cos, sin), each (B, T, heads, head_dim // 2), computed in fp32 and cast to `dtype`.
    """
    if positions.ndim == 2:
        positions = positions[..., None]
    max_pos = [max_pos] if isinstance(max_pos, (int, float)) else list(max_pos)
    n_axes = positions.shape[-1]
    if len(max_pos) != n_axes:
        raise ValueError(f"split_rope: positions have {n_axes} axes but max_pos has {len(max_pos)} entries")
    grid = _rope_grid(float(theta), inner_dim // (2 * n_axes), bool(double_precision)).to(positions.device)
    frac = positions.float() / torch.tensor(max_pos, dtype=torch.float32, device=positions.device)
    freqs = (grid * (frac[..., None] * 2 - 1)).transpose(-1, -2).flatten(2)  # (B, T, n_axes * n_grid)
    cos, sin = freqs.cos(), freqs.sin()
    pad = inner_dim // 2 - freqs.shape[-1]
    if pad:
        cos = torch.cat([torch.ones_like(cos[..., :pad]), cos], dim=-1)
        sin = torch.cat([torch.zeros_like(sin[..., :pad]), sin], dim=-1)
    B, T, _ = cos.shape
    return cos.view(B, T, heads, -1).to(dtype), sin.view(B, T, heads, -1).to(dtype)


def apply_rope(x, cos, sin):
    """Rotate x (B, T, H*head_dim): each head's halves a, b -> (a cos - b sin, b cos + a sin).

    H is the table's (cos (B, T, H, head_dim/2)): the cross-modal rope of the video stream groups
    the audio-width q by the video's head count, as the reference does.
    """
    B, T, _ = x.shape
    a, b = x.view(B, T, cos.shape[2], 2, -1).unbind(-2)  # (B, T, H, head_dim/2) each
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).view(B, T, -1)


class Attention(nn.Module):
    """Multi-head attention with q/k RMSNorm over the full width, split RoPE and per-head gates.

    The gate is `2 * sigmoid(to_gate_logits(x))` per head, so a zero-initialised gate is identity.
    """

    def __init__(self, query_dim, context_dim, heads, head_dim, gated=True, eps=1e-6):
        super().__init__()
        inner_dim = heads * head_dim
        context_dim = query_dim if context_dim is None else context_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(query_dim, inner_dim)
        self.to_k = nn.Linear(context_dim, inner_dim)
        self.to_v = nn.Linear(context_dim, inner_dim)
        self.q_norm = RMSNorm(inner_dim, eps)
        self.k_norm = RMSNorm(inner_dim, eps)
        self.to_gate_logits = nn.Linear(query_dim, heads) if gated else None
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim))  # key `to_out.0`, as the checkpoint

    def forward(self, x, context=None, rope=None, mask=None, skip_attention=False, k_rope=None):
        """x (B, Tq, query_dim), context (B, Tk, context_dim) or None for self-attention.

        rope: (cos, sin) from `split_rope`, applied to q, and to k unless k_rope is given (the
        cross-modal attentions rotate keys with the other stream's positions). mask: bool
        (True = attend) or additive float, broadcastable to (B, heads, Tq, Tk). skip_attention (STG): True, or a (B,)
        bool tensor selecting samples, replaces the attention output by `to_v(context)`; the gate
        and `to_out` still apply.
        """
        context = x if context is None else context
        B, Tq, _ = x.shape
        H, Dh = self.heads, self.head_dim
        v = self.to_v(context)  # (B, Tk, H*Dh)
        if skip_attention is True:
            out = v
        else:
            q = self.q_norm(self.to_q(x))
            k = self.k_norm(self.to_k(context))
            if rope is not None:
                q, k = apply_rope(q, *rope), apply_rope(k, *(rope if k_rope is None else k_rope))
            q, k, vh = (t.view(B, -1, H, Dh).transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, vh, attn_mask=mask)  # (B, H, Tq, Dh)
            out = out.transpose(1, 2).reshape(B, Tq, H * Dh)
            if isinstance(skip_attention, torch.Tensor):
                out = torch.where(skip_attention.view(B, 1, 1), v, out)
        if self.to_gate_logits is not None:
            gate = 2.0 * torch.sigmoid(self.to_gate_logits(x))  # (B, Tq, H)
            out = (out.view(B, Tq, H, Dh) * gate[..., None]).view(B, Tq, H * Dh)
        return self.to_out(out)


class GELUProj(nn.Module):
    """Linear followed by tanh-approximated GELU (the checkpoint's `net.0.proj`)."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """dim -> mult*dim (GELU tanh) -> dim_out. The Identity at net.1 keeps the official key `net.2`."""

    def __init__(self, dim, mult=4, dim_out=None):
        super().__init__()
        self.net = nn.Sequential(GELUProj(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim_out or dim))

    def forward(self, x):
        return self.net(x)
