"""The LTX-2 audio DiT (audio stream of the 22B LTX-2.3 / 19B LTX-2.0 audio-video transformer).

Module and parameter names follow the official checkpoint (after stripping `model.diffusion_model.`),
so an official state dict loads with `strict=True` after the audio-only filter. Facts (shapes,
formulas, row order of the modulation) are in SPEC §2; the reference is ltx-core 1.0.0
(`ltx_core/model/transformer/`), against which tests/test_model.py checks this file.

    model = load_dit("ltx-2.3-22b-dev.safetensors", device="cuda", dtype=torch.bfloat16)
    v = model(x_t, sigma, context)                      # (B, T, 128) velocity
"""

import functools
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

# -----------------------------------------------------------------------------------------------
# building blocks (shared with text.py's connector)


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


def apply_rope(x, cos, sin, heads):
    """Rotate x (B, T, heads*head_dim): each head's halves a, b -> (a cos - b sin, b cos + a sin)."""
    B, T, _ = x.shape
    a, b = x.view(B, T, heads, 2, -1).unbind(-2)  # (B, T, H, head_dim/2) each
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

    def forward(self, x, context=None, rope=None, mask=None, skip_attention=False):
        """x (B, Tq, query_dim), context (B, Tk, context_dim) or None for self-attention.

        rope: (cos, sin) from `split_rope`, applied to q and k. mask: bool (True = attend) or
        additive float, broadcastable to (B, heads, Tq, Tk). skip_attention (STG): True, or a (B,)
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
                q, k = apply_rope(q, *rope, H), apply_rope(k, *rope, H)
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


# -----------------------------------------------------------------------------------------------
# the audio DiT


@dataclass
class DiTConfig:
    """Shape and variant of the audio DiT. `ltx23_audio` is the official LTX-2.3 audio stream."""

    num_layers: int = 48
    heads: int = 32
    head_dim: int = 64
    in_channels: int = 128  # latent features per token: 8 VAE channels x 16 mel bins for LTX
    cross_attention_dim: int = 2048  # width of the text context seen by audio_attn2
    gated_attention: bool = True  # 2.3: per-head gates on every attention
    cross_attention_adaln: bool = True  # 2.3: 9-row modulation + prompt AdaLN on the text keys/values
    caption_channels: int = 0  # 2.0: audio_caption_projection from this width inside the DiT (0 = none)
    eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_max_pos: float = 20.0  # seconds (audio_positional_embedding_max_pos)
    rope_double_precision: bool = True  # frequencies_precision: float64
    timestep_scale: float = 1000.0  # the model sees sigma * 1000
    stg_block: int = 28  # block whose self-attention the reference skips for STG guidance
    grad_checkpointing: bool = False

    @property
    def dim(self):
        return self.heads * self.head_dim

    @property
    def ada_rows(self):
        """Rows of the per-block modulation: shift/scale/gate for attn1 and ff (+ q for attn2 in 2.3)."""
        return 9 if self.cross_attention_adaln else 6


PRESETS = {
    # LTX-2.3 22B audio stream: 3,286,408,320 params (SPEC §2)
    "ltx23_audio": DiTConfig(),
    # LTX-2.0 19B audio stream: 6 rows, no gates, Gemma features projected inside the DiT
    "ltx20_audio": DiTConfig(gated_attention=False, cross_attention_adaln=False, caption_channels=3840, stg_block=29),
    # CPU-sized 2.3-style models for experiments and tests
    "tiny": DiTConfig(num_layers=6, heads=4, head_dim=64, cross_attention_dim=256, stg_block=3),
    "micro": DiTConfig(num_layers=2, heads=2, head_dim=16, in_channels=16, cross_attention_dim=32, stg_block=1),
}


def audio_positions(T, B=1, offset_s=0.0, device=None):
    """RoPE positions (B, T) in seconds of T audio latents: the midpoint of each latent's span.

    The causal audio VAE (hop 160 @ 16 kHz, x4 in time) makes latent i cover mel frames
    [max(4i-3, 0), max(4i+1, 0)), i.e. 0.01 s each; computed in fp32 as the reference patchifier.
    `offset_s` shifts the whole clip (DramaBox places reference-voice tokens at +0.5 s).
    """
    i = torch.arange(T + 1, dtype=torch.float32, device=device)
    edges = (i * 4 + 1 - 4).clip(min=0) * 160 / 16000  # start of latent i = end of latent i-1
    mid = (edges[:-1] + offset_s + edges[1:] + offset_s) / 2
    return mid.expand(B, T)


def timestep_sinusoid(t, dim=256):
    """Sinusoidal embedding (N,) -> (N, dim) laid out [cos, sin], frequencies exp(-ln(1e4) k/(dim/2)), fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class TimestepMLP(nn.Module):
    """sinusoid(256) -> linear_1 -> SiLU -> linear_2 (the checkpoint's `emb.timestep_embedder`)."""

    def __init__(self, dim):
        super().__init__()
        self.linear_1 = nn.Linear(256, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t, dtype):
        return self.linear_2(F.silu(self.linear_1(timestep_sinusoid(t).to(dtype))))


class AdaLNSingle(nn.Module):
    """adaLN-single (PixArt-alpha): scaled timestep (N,) -> (modulation (N, rows*D), embedding (N, D))."""

    def __init__(self, dim, rows):
        super().__init__()
        self.emb = nn.ModuleDict({"timestep_embedder": TimestepMLP(dim)})  # key `emb.timestep_embedder.*`
        self.linear = nn.Linear(dim, rows * dim)

    def forward(self, t, dtype):
        embedded = self.emb["timestep_embedder"](t, dtype)
        return self.linear(F.silu(embedded)), embedded


class CaptionProjection(nn.Module):
    """LTX-2.0 only: text features (caption_channels) -> D -> D with a tanh-GELU between."""

    def __init__(self, in_dim, dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class AudioBlock(nn.Module):
    """One audio transformer block: self-attention, text cross-attention, feed-forward, AdaLN-modulated."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.dim
        self.eps = cfg.eps
        self.audio_attn1 = Attention(D, None, cfg.heads, cfg.head_dim, cfg.gated_attention, cfg.eps)
        self.audio_attn2 = Attention(D, cfg.cross_attention_dim, cfg.heads, cfg.head_dim, cfg.gated_attention, cfg.eps)
        self.audio_ff = FeedForward(D)
        self.audio_scale_shift_table = nn.Parameter(torch.zeros(cfg.ada_rows, D))
        if cfg.cross_attention_adaln:
            self.audio_prompt_scale_shift_table = nn.Parameter(torch.zeros(2, D))

    def forward(self, x, context, temb, prompt_temb, rope, attn_mask, context_mask, skip_attention):
        """x (B, T, D); temb (B, Tt, rows*D) with Tt 1 or T (delta already added); prompt_temb (B, 1, 2D)."""
        B, Tt, _ = temb.shape
        rows, D = self.audio_scale_shift_table.shape
        ada = temb.view(B, Tt, rows, D) + self.audio_scale_shift_table.to(temb.dtype)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, *q_rows = ada.unbind(2)

        # addcmul: one fused kernel (and one saved tensor) for each `a + b * c` of the math
        h = torch.addcmul(shift_msa, rms_norm(x, self.eps), 1 + scale_msa)
        x = torch.addcmul(x, self.audio_attn1(h, rope=rope, mask=attn_mask, skip_attention=skip_attention), gate_msa)

        if q_rows:  # 2.3: AdaLN on the query (per token) and on the text keys/values (per sample)
            shift_q, scale_q, gate_q = q_rows
            table = self.audio_prompt_scale_shift_table.to(prompt_temb.dtype)
            shift_kv, scale_kv = (prompt_temb.view(B, -1, 2, D) + table).unbind(2)
            h = torch.addcmul(shift_q, rms_norm(x, self.eps), 1 + scale_q)
            kv = torch.addcmul(shift_kv, context, 1 + scale_kv)
            x = torch.addcmul(x, self.audio_attn2(h, kv, mask=context_mask), gate_q)
        else:
            x = x + self.audio_attn2(rms_norm(x, self.eps), context, mask=context_mask)

        h = torch.addcmul(shift_mlp, rms_norm(x, self.eps), 1 + scale_mlp)
        return torch.addcmul(x, self.audio_ff(h), gate_mlp)


class AudioDiT(nn.Module):
    """The audio-only LTX-2 DiT, predicting the flow velocity v = eps - x0 of audio latent tokens."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = cfg.grad_checkpointing
        D = cfg.dim
        self.audio_patchify_proj = nn.Linear(cfg.in_channels, D)
        if cfg.caption_channels:
            self.audio_caption_projection = CaptionProjection(cfg.caption_channels, D)
        self.audio_adaln_single = AdaLNSingle(D, cfg.ada_rows)
        if cfg.cross_attention_adaln:
            self.audio_prompt_adaln_single = AdaLNSingle(D, 2)
        self.transformer_blocks = nn.ModuleList(AudioBlock(cfg) for _ in range(cfg.num_layers))
        self.audio_scale_shift_table = nn.Parameter(torch.zeros(2, D))
        self.audio_proj_out = nn.Linear(D, cfg.in_channels)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """adaLN-Zero init (DiT): zero modulation and output head, so a fresh model starts at v = 0
        with every block an identity; attention gates start at 2*sigmoid(0) = 1. Official
        checkpoints overwrite all of it."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        for name, p in self.named_parameters():
            if "scale_shift_table" in name:
                nn.init.zeros_(p)
        zero = [self.audio_adaln_single.linear, self.audio_proj_out]
        if self.cfg.cross_attention_adaln:
            zero.append(self.audio_prompt_adaln_single.linear)
        if self.cfg.gated_attention:
            zero += [attn.to_gate_logits for blk in self.transformer_blocks
                     for attn in (blk.audio_attn1, blk.audio_attn2)]
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x, sigma, context, *, timesteps=None, positions=None, context_mask=None, attn_mask=None,
                stg_blocks=(), block_deltas=None, stg_samples=None):
        """Velocity v (B, T, C) of noisy latent tokens x (B, T, C) at noise level sigma (B,) in [0, 1].

        context: (B, L, cross_attention_dim) text features (caption_channels for LTX-2.0).
        timesteps: optional per-token sigma (B, T) (0 for clean reference tokens); the prompt AdaLN
            always takes the per-sample `sigma`.
        positions: (B, T) RoPE positions in seconds; default `audio_positions(T, B)`.
        context_mask: (B, L) bool, True = real text token. attn_mask: self-attention mask
            (B or 1, T, T), bool (True = attend) or additive float.
        stg_blocks: indices of blocks whose self-attention is skipped (STG); stg_samples: optional
            (B,) bool restricting the skip to some samples of the batch (batched guidance passes).
        block_deltas: (B, num_layers, rows*D) added to every block's timestep modulation
            (SpeakerAdaLNZero); cast to the modulation's dtype.
        """
        cfg = self.cfg
        B, T, _ = x.shape
        h = self.audio_patchify_proj(x)  # (B, T, D)
        dtype = h.dtype

        t = sigma[:, None] if timesteps is None else timesteps  # (B, Tt), Tt = 1 or T
        temb, embedded_t = self.audio_adaln_single(t.float().flatten() * cfg.timestep_scale, dtype)
        temb, embedded_t = temb.view(B, t.shape[1], -1), embedded_t.view(B, t.shape[1], -1)
        prompt_temb = None
        if cfg.cross_attention_adaln:
            prompt_temb = self.audio_prompt_adaln_single(sigma.float() * cfg.timestep_scale, dtype)[0].view(B, 1, -1)

        if cfg.caption_channels:
            context = self.audio_caption_projection(context)
        if context_mask is not None:
            # -max rather than -inf, as the reference: a sample with no valid token stays finite
            context_mask = _additive_mask(context_mask, dtype, -torch.finfo(dtype).max).view(B, 1, 1, -1)
        if attn_mask is not None:
            attn_mask = _additive_mask(attn_mask, dtype, torch.finfo(dtype).min)[:, None]  # (B|1, 1, T, T)

        if positions is None:
            positions = audio_positions(T, B, device=x.device)
        rope = split_rope(positions, cfg.rope_max_pos, cfg.dim, cfg.heads, cfg.rope_theta, dtype,
                          cfg.rope_double_precision)

        if block_deltas is not None and tuple(block_deltas.shape) != (B, cfg.num_layers, temb.shape[-1]):
            raise ValueError(f"block_deltas {tuple(block_deltas.shape)}: expected (B, num_layers, rows*D) = "
                             f"{(B, cfg.num_layers, temb.shape[-1])}")
        stg_blocks = set(stg_blocks)
        for i, block in enumerate(self.transformer_blocks):
            block_temb = temb if block_deltas is None else temb + block_deltas[:, i, None].to(dtype)
            skip = (True if stg_samples is None else stg_samples) if i in stg_blocks else False
            args = (h, context, block_temb, prompt_temb, rope, attn_mask, context_mask, skip)
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, *args, use_reentrant=False)
            else:
                h = block(*args)

        shift, scale = (self.audio_scale_shift_table.to(dtype) + embedded_t[:, :, None]).unbind(2)
        h = torch.addcmul(shift, F.layer_norm(h, (cfg.dim,), eps=cfg.eps), 1 + scale)
        return self.audio_proj_out(h)


def _additive_mask(mask, dtype, neg):
    """bool / integer mask (True or 1 = attend) -> additive bias with `neg` at blocked entries;
    a floating mask is taken as an additive bias already."""
    if torch.is_floating_point(mask):
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask.bool(), neg)


def count_params(model, trainable_only=False):
    """Number of parameters (works on meta-device models)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# -----------------------------------------------------------------------------------------------
# checkpoint IO (official safetensors layout: `model.diffusion_model.` prefix, JSON config in metadata)

PREFIX = "model.diffusion_model."
# a key belongs to the audio-only model iff it contains one of these (SPEC §2); 2.0 adds the caption projection
AUDIO_KEY_PARTS = ("audio_attn1", "audio_attn2", "audio_ff", "audio_patchify", "audio_proj_out",
                   "audio_adaln_single", "audio_prompt", "audio_scale_shift_table", "audio_caption_projection")


def is_audio_key(name):
    """True for a (prefix-stripped) transformer key of the audio-only DiT."""
    return any(part in name for part in AUDIO_KEY_PARTS)


def read_safetensors_metadata(path):
    """The `__metadata__` dict (str -> str) of a safetensors file, {} when it has none."""
    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


def read_checkpoint_config(path):
    """The parsed JSON `__metadata__["config"]` of an LTX-2 checkpoint, with a clear error if absent."""
    meta = read_safetensors_metadata(path)
    if "config" not in meta:
        raise ValueError(f"{path}: no __metadata__['config']; not an LTX-2 checkpoint (metadata keys: {sorted(meta)})")
    try:
        return json.loads(meta["config"])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: __metadata__['config'] is not valid JSON ({e})") from e


def load_prefixed_state(path, prefix, keep=None, device="cpu", dtype=None):
    """Tensors whose key starts with `prefix`, returned with the prefix removed, read one by one.

    keep: optional predicate on the stripped name; dtype: cast floating tensors to it. Only the
    selected tensors are read (safetensors memory-maps the file), so a 40 GB file is fine.
    """
    path = os.fspath(path)
    state = {}
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                if not key.startswith(prefix) or (keep is not None and not keep(key[len(prefix):])):
                    continue
                t = f.get_tensor(key)
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                state[key[len(prefix):]] = t.to(device)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read tensors ({e})") from e
    return state


def dit_config_from_metadata(config):
    """DiTConfig of the audio stream from a checkpoint's parsed metadata config (or its "transformer" part)."""
    tc = config.get("transformer", config)
    if "audio_num_attention_heads" not in tc:
        raise ValueError("transformer config has no audio stream (no 'audio_num_attention_heads'): video-only model?")
    if tc.get("rope_type", "interleaved") != "split":
        raise ValueError(f"rope_type {tc.get('rope_type', 'interleaved')!r} is not supported (only 'split')")
    if not tc.get("use_middle_indices_grid", True):
        raise ValueError("use_middle_indices_grid=False is not supported")
    ca_adaln = bool(tc.get("cross_attention_adaln", False))
    return DiTConfig(
        num_layers=tc["num_layers"],
        heads=tc["audio_num_attention_heads"],
        head_dim=tc["audio_attention_head_dim"],
        in_channels=tc.get("audio_in_channels", 128),
        cross_attention_dim=tc.get("audio_cross_attention_dim", 2048),
        gated_attention=bool(tc.get("apply_gated_attention", False)),
        cross_attention_adaln=ca_adaln,
        caption_channels=0 if tc.get("caption_proj_before_connector", False) else tc.get("caption_channels", 3840),
        rope_theta=float(tc.get("positional_embedding_theta", 10000.0)),
        rope_max_pos=float(tc.get("audio_positional_embedding_max_pos", [20])[0]),
        rope_double_precision=tc.get("frequencies_precision") == "float64",
        timestep_scale=float(tc.get("timestep_scale_multiplier", 1000)),
        stg_block=tc.get("stg_block", 28 if ca_adaln else 29),  # not in official configs: 2.3 uses 28, 2.0 29
    )


def metadata_from_dit_config(cfg):
    """Checkpoint metadata ({"config": JSON}) describing `cfg` in the official transformer-config
    vocabulary, for models that did not come from an official file."""
    tc = {
        "num_layers": cfg.num_layers,
        "audio_num_attention_heads": cfg.heads,
        "audio_attention_head_dim": cfg.head_dim,
        "audio_in_channels": cfg.in_channels,
        "audio_out_channels": cfg.in_channels,
        "audio_cross_attention_dim": cfg.cross_attention_dim,
        "apply_gated_attention": cfg.gated_attention,
        "cross_attention_adaln": cfg.cross_attention_adaln,
        "caption_proj_before_connector": not cfg.caption_channels,
        "caption_channels": cfg.caption_channels or 3840,
        "positional_embedding_theta": cfg.rope_theta,
        "audio_positional_embedding_max_pos": [cfg.rope_max_pos],
        "frequencies_precision": "float64" if cfg.rope_double_precision else "float32",
        "timestep_scale_multiplier": cfg.timestep_scale,
        "rope_type": "split",
        "use_middle_indices_grid": True,
        "stg_block": cfg.stg_block,
    }
    return {"config": json.dumps({"transformer": tc})}


def load_dit(path, *, device="cpu", dtype=None, strict=True):
    """AudioDiT built from an official / merged LTX-2 checkpoint's own metadata, audio keys only.

    Video, cross-modal and text-connector keys are skipped. Tensors are read one at a time into a
    model built on the meta device, so peak memory is the audio model itself. dtype defaults to the
    file's (that of `audio_patchify_proj.weight`). strict=False keeps a fresh init for missing keys.
    """
    path = os.fspath(path)
    try:
        cfg = dit_config_from_metadata(read_checkpoint_config(path))
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: cannot build the audio DiT from its metadata: {e}") from e
    state = load_prefixed_state(path, PREFIX, keep=is_audio_key, device=device, dtype=dtype)
    if not state:
        raise ValueError(f"{path}: no audio transformer keys ('{PREFIX}audio_*'); a video-only or other model")
    if dtype is None:
        dtype = state["audio_patchify_proj.weight"].dtype if "audio_patchify_proj.weight" in state else torch.float32

    with torch.device("meta"):
        model = AudioDiT(cfg)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k])}"
             for k in sorted(state.keys() & expected.keys()) if state[k].shape != expected[k]]
    if wrong or (strict and (missing or unexpected)):
        raise ValueError(f"{path}: audio DiT weights do not match its config {cfg}:\n"
                         + _key_report(missing, unexpected, wrong))
    if missing or unexpected:
        print(f"load_dit({path}): non-strict load\n" + _key_report(missing, unexpected, wrong))
        model = AudioDiT(cfg).to(device=device, dtype=dtype)  # real init for the missing keys
        model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    else:
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model


def _key_report(missing, unexpected, wrong, shown=10):
    lines = []
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if keys:
            more = f" ... (+{len(keys) - shown} more)" if len(keys) > shown else ""
            lines.append(f"  {len(keys)} {title}: " + ", ".join(keys[:shown]) + more)
    return "\n".join(lines)


def save_dit(model, path, metadata=None, extra=None):
    """Write the model's weights in the official layout (`model.diffusion_model.` prefix), atomically.

    metadata: the source checkpoint's `__metadata__` to keep (config included); default: a config
    describing `model.cfg`, so `load_dit` can read the file back. extra: more tensors under their
    full keys (e.g. the text connector's `model.diffusion_model.audio_embeddings_connector.*`).
    """
    path = os.fspath(path)
    metadata = dict(metadata) if metadata else metadata_from_dit_config(model.cfg)
    tensors = {PREFIX + k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    clash = tensors.keys() & (extra or {}).keys()
    if clash:
        raise ValueError(f"save_dit({path}): extra tensors collide with DiT keys: {sorted(clash)[:5]}")
    tensors.update({k: v.detach().contiguous().cpu() for k, v in (extra or {}).items()})
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)
