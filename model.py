"""The LTX-2 audio DiT (audio stream of the 22B LTX-2.3 / 19B LTX-2.0 audio-video transformer).

Module and parameter names follow the official checkpoint (after stripping `model.diffusion_model.`),
so an official state dict loads with `strict=True` after the audio-only filter. Shapes,
formulas and the row order of the modulation follow the reference, ltx-core 1.0.0
(`ltx_core/model/transformer/`), against which tests/test_model.py (audio-only) and
tests/test_av_model.py (audio-video) check this file.

    model = load_dit("ltx-2.3-22b-dev.safetensors", device="cuda", dtype=torch.bfloat16)
    v = model(x_t, sigma, context)                      # (B, T, 128) velocity

The audio-video mode (`DiTConfig.video`, `load_dit(..., av=True)`) adds the video stream and the
cross-modal attentions (ltx-core's `BasicAVTransformerBlock`); its blocks reuse the audio block's code:

    av = load_dit("ltx-2.3-22b-dev.safetensors", av=True)
    v_video, v_audio = av.forward_av(xv_t, xa_t, sigma_v, sigma_a, ctx_v, ctx_a, video_positions=pos)
"""

import json
import math
import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from audio import SAMPLE_RATE
from files import BadFile, load_prefixed_state, read_checkpoint_config, save_safetensors
from layers import PROGRESS_OUTSIDE, Attention, FeedForward, RMSNorm, rms_norm, split_rope  # shared with text.py

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
    # Not in LTX-2 (0 = off, as every official file): > 0 rotates the text cross-attention's queries and
    # keys by where each audio token and each spoken text token lies in its utterance (0..1, `text_progress`,
    # `audio_progress` of `forward`) at rotary frequencies theta**linspace(0,1)*pi/2. The head then scores
    # a key by its distance from the diagonal of a monotonic alignment: a prior that a small model trained
    # from scratch for minutes can use, where LTX-2 learned its alignment from vast data.
    text_progress_theta: float = 0.0
    grad_checkpointing: bool = False
    # --- audio-video mode (ltx-core's AV transformer): the video stream and the cross-modal attentions
    video: bool = False  # off: the audio-only model, no video module is built
    video_heads: int = 32
    video_head_dim: int = 128
    video_in_channels: int = 128  # video latent features per token (128 VAE channels, patch 1)
    video_cross_attention_dim: int = 4096  # width of the video text context seen by attn2
    video_rope_max_pos: tuple = (20.0, 2048.0, 2048.0)  # (seconds, pixels, pixels): positional_embedding_max_pos
    av_ca_timestep_scale: float = 1000.0  # av_ca_timestep_scale_multiplier: input scale of the a2v/v2a gate AdaLN

    @property
    def dim(self):
        return self.heads * self.head_dim

    @property
    def video_dim(self):
        return self.video_heads * self.video_head_dim

    @property
    def cross_rope_max_pos(self):
        """max_pos of the cross-modal rope (time only): the larger of the two streams' time max_pos."""
        return max(float(self.video_rope_max_pos[0]), float(self.rope_max_pos))

    @property
    def ada_rows(self):
        """Rows of the per-block modulation: shift/scale/gate for attn1 and ff (+ q for attn2 in 2.3)."""
        return 9 if self.cross_attention_adaln else 6


PRESETS = {
    # LTX-2.3 22B audio stream: 3,286,408,320 params (tests/data/ltx23/README.md)
    "ltx23_audio": DiTConfig(),
    # LTX-2.0 19B audio stream: 6 rows, no gates, Gemma features projected inside the DiT
    "ltx20_audio": DiTConfig(gated_attention=False, cross_attention_adaln=False, caption_channels=3840, stg_block=29),
    # CPU-sized 2.3-style models for experiments and tests
    "tiny": DiTConfig(num_layers=6, heads=4, head_dim=64, cross_attention_dim=256, stg_block=3),
    # tiny, 3 heads wide: the tiny pipeline's base. A training step costs ~0.65x tiny's on a CPU, and at the
    # pipeline's few minutes of training the extra steps buy more than the width: at equal wall time
    # val loss 0.397 -> 0.361, DNSMOS OVR of its unconditional samples 1.09 -> 1.44 (records/2026-11-30_narrow_base.md)
    "tiny192": DiTConfig(num_layers=6, heads=3, head_dim=64, cross_attention_dim=192, stg_block=3),
    "micro": DiTConfig(num_layers=2, heads=2, head_dim=16, in_channels=16, cross_attention_dim=32, stg_block=1),
    # LTX-2.3 22B audio-video transformer: 18,988,838,144 params (tests/data/ltx23/README.md)
    "ltx23_av": DiTConfig(video=True),
    # CPU-sized audio-video models: the audio stream of `tiny` / `micro` (same text connector) plus a
    # video stream twice as wide; the text widths equal the stream widths, as the reference requires
    "tiny_av": DiTConfig(num_layers=4, heads=4, head_dim=64, cross_attention_dim=256, stg_block=2, video=True,
                         video_heads=4, video_head_dim=128, video_cross_attention_dim=512),
    "micro_av": DiTConfig(num_layers=2, heads=2, head_dim=16, in_channels=16, cross_attention_dim=32, stg_block=1,
                          video=True, video_heads=2, video_head_dim=32, video_in_channels=24,
                          video_cross_attention_dim=64),
}


def audio_progress(n_target, T):
    """(B, T) progress of each audio token through its clip's generated span: token t of the n_target[b]
    leading (target) tokens at (t + 0.5) / n_target[b], the rest (reference, padding) PROGRESS_OUTSIDE."""
    out = torch.full((len(n_target), T), PROGRESS_OUTSIDE)
    for b, n in enumerate(n_target):
        out[b, :n] = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    return out


def audio_positions(T, B=1, offset_s=0.0, device=None):
    """RoPE positions (B, T) in seconds of T audio latents: the midpoint of each latent's span.

    The causal audio VAE (hop 160 @ 16 kHz, x4 in time) makes latent i cover mel frames
    [max(4i-3, 0), max(4i+1, 0)), i.e. 0.01 s each; computed in fp32 as the reference patchifier.
    `offset_s` shifts the whole clip (DramaBox places reference-voice tokens at +0.5 s).
    """
    i = torch.arange(T + 1, dtype=torch.float32, device=device)
    edges = (i * 4 + 1 - 4).clip(min=0) * 160 / SAMPLE_RATE  # start of latent i = end of latent i-1
    mid = (edges[:-1] + offset_s + edges[1:] + offset_s) / 2
    return mid.expand(B, T)


_default_audio_positions = audio_positions  # forward_av's argument of that name shadows the function


def video_positions(frames, height, width, B=1, fps=24.0, scale=(8, 32, 32), device=None):
    """RoPE positions (B, frames*height*width, 3) of a video latent grid, tokens in (f, h, w) order.

    Each latent covers pixel spans [i*s, (i+1)*s) per axis (VAE factors `scale`); the causal VAE
    encodes the first frame alone, so time spans are shifted by 1 - s_t and clipped at 0, then
    divided by fps (seconds). The position is the span's midpoint (as ltx-core's patchifier with
    `use_middle_indices_grid`).
    """
    axes = []
    for n, s, is_time in ((frames, scale[0], True), (height, scale[1], False), (width, scale[2], False)):
        edges = torch.arange(n + 1, dtype=torch.float32, device=device) * s
        if is_time:
            edges = ((edges + 1 - s).clip(min=0)) / fps
        axes.append((edges[:-1] + edges[1:]) / 2)
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).view(-1, 3)  # (F*H*W, 3)
    return grid.expand(B, -1, 3)


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


def _modulation(table, temb):
    """Rows of `table` (rows, D) + temb (B, Tt, rows*D) -> `rows` tensors of (B, Tt, D)."""
    B, Tt, _ = temb.shape
    rows, D = table.shape
    return (temb.view(B, Tt, rows, D) + table.to(temb.dtype)).unbind(2)


def _attend(x, attn1, attn2, ada, prompt_table, context, prompt_temb, rope, attn_mask, context_mask, skip, eps,
            text_rope=None):
    """Self-attention then text cross-attention of one stream, AdaLN-modulated by the rows `ada`.

    Shared by the audio stream (`audio_attn1/2`, `audio_prompt_scale_shift_table`) and the video
    stream (`attn1/2`, `prompt_scale_shift_table`); arguments as in `AudioBlock.forward`.
    text_rope: None, or ((cos, sin) of the queries, (cos, sin) of the text keys) for the cross-attention.
    """
    q_rope, k_rope = text_rope if text_rope is not None else (None, None)
    shift_msa, scale_msa, gate_msa, _, _, _, *q_rows = ada
    # addcmul: one fused kernel (and one saved tensor) for each `a + b * c` of the math
    h = torch.addcmul(shift_msa, rms_norm(x, eps), 1 + scale_msa)
    x = torch.addcmul(x, attn1(h, rope=rope, mask=attn_mask, skip_attention=skip), gate_msa)
    if q_rows:  # 2.3: AdaLN on the query (per token) and on the text keys/values (per sample)
        shift_q, scale_q, gate_q = q_rows
        shift_kv, scale_kv = (prompt_temb.unflatten(-1, (2, -1)) + prompt_table.to(prompt_temb.dtype)).unbind(2)
        h = torch.addcmul(shift_q, rms_norm(x, eps), 1 + scale_q)
        kv = torch.addcmul(shift_kv, context, 1 + scale_kv)
        return torch.addcmul(x, attn2(h, kv, mask=context_mask, rope=q_rope, k_rope=k_rope), gate_q)
    return x + attn2(rms_norm(x, eps), context, mask=context_mask, rope=q_rope, k_rope=k_rope)


def _feed_forward(x, ff, ada, eps):
    """The modulated feed-forward of one stream (rows 3..5 of `ada`)."""
    shift_mlp, scale_mlp, gate_mlp = ada[3:6]
    return torch.addcmul(x, ff(torch.addcmul(shift_mlp, rms_norm(x, eps), 1 + scale_mlp)), gate_mlp)


@dataclass
class StreamInputs:
    """What every AV block reads of one stream, prepared once per forward by `AudioDiT.forward_av`.

    Fields as the arguments of `AudioBlock.forward` (skip: this block's STG switch, replaced per
    block), plus cross_temb (B, 1, 4D) and cross_gate (B, 1, D), both embedded from the OTHER
    stream's sigma, and cross_rope (cos, sin) of this stream's time axis at the audio width.
    """

    context: torch.Tensor
    temb: torch.Tensor
    prompt_temb: torch.Tensor | None
    rope: tuple
    attn_mask: torch.Tensor | None = None
    context_mask: torch.Tensor | None = None
    skip: object = False
    cross_temb: torch.Tensor | None = None
    cross_gate: torch.Tensor | None = None
    cross_rope: tuple | None = None


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

    def forward(self, x, context, temb, prompt_temb, rope, attn_mask, context_mask, skip_attention, text_rope=None):
        """x (B, T, D); temb (B, Tt, rows*D) with Tt 1 or T (delta already added); prompt_temb (B, 1, 2D);
        text_rope: the cross-attention's progress rope (`AudioDiT.forward`) or None."""
        ada = _modulation(self.audio_scale_shift_table, temb)
        x = _attend(x, self.audio_attn1, self.audio_attn2, ada, getattr(self, "audio_prompt_scale_shift_table", None),
                    context, prompt_temb, rope, attn_mask, context_mask, skip_attention, self.eps, text_rope)
        return _feed_forward(x, self.audio_ff, ada, self.eps)


class AVBlock(AudioBlock):
    """An audio block plus the video stream (same layout, width Dv) and the two cross-modal attentions.

    Order (ltx-core `BasicAVTransformerBlock`): video self+text attention, audio self+text
    attention, then audio->video and video->audio cross-attention, both reading RMS-normed copies
    of the streams taken before either update, then video FF, audio FF. `forward` (inherited) is
    the audio-only pass, as the reference with no video input.
    """

    def __init__(self, cfg):
        super().__init__(cfg)
        Dv, Da = cfg.video_dim, cfg.dim
        gated = cfg.gated_attention
        self.attn1 = Attention(Dv, None, cfg.video_heads, cfg.video_head_dim, gated, cfg.eps)
        self.attn2 = Attention(Dv, cfg.video_cross_attention_dim, cfg.video_heads, cfg.video_head_dim, gated, cfg.eps)
        self.ff = FeedForward(Dv)
        self.scale_shift_table = nn.Parameter(torch.zeros(cfg.ada_rows, Dv))
        # both cross-modal attentions work at the audio width and head layout
        self.audio_to_video_attn = Attention(Dv, Da, cfg.heads, cfg.head_dim, gated, cfg.eps)  # Q video, KV audio
        self.video_to_audio_attn = Attention(Da, Dv, cfg.heads, cfg.head_dim, gated, cfg.eps)  # Q audio, KV video
        # rows: 0 scale_a2v, 1 shift_a2v, 2 scale_v2a, 3 shift_v2a, 4 gate (of the attention writing this stream)
        self.scale_shift_table_a2v_ca_audio = nn.Parameter(torch.zeros(5, Da))
        self.scale_shift_table_a2v_ca_video = nn.Parameter(torch.zeros(5, Dv))
        if cfg.cross_attention_adaln:
            self.prompt_scale_shift_table = nn.Parameter(torch.zeros(2, Dv))

    def forward_av(self, vx, ax, v, a):
        """vx (B, Tv, Dv), ax (B, Ta, Da); v, a: the streams' `StreamInputs`. Returns (vx, ax)."""
        v_ada = _modulation(self.scale_shift_table, v.temb)
        vx = _attend(vx, self.attn1, self.attn2, v_ada, getattr(self, "prompt_scale_shift_table", None),
                     v.context, v.prompt_temb, v.rope, v.attn_mask, v.context_mask, v.skip, self.eps)
        a_ada = _modulation(self.audio_scale_shift_table, a.temb)
        ax = _attend(ax, self.audio_attn1, self.audio_attn2, a_ada,
                     getattr(self, "audio_prompt_scale_shift_table", None),
                     a.context, a.prompt_temb, a.rope, a.attn_mask, a.context_mask, a.skip, self.eps)

        vn, an = rms_norm(vx, self.eps), rms_norm(ax, self.eps)
        v_scale_a2v, v_shift_a2v, v_scale_v2a, v_shift_v2a = _modulation(self.scale_shift_table_a2v_ca_video[:4],
                                                                          v.cross_temb)
        a_scale_a2v, a_shift_a2v, a_scale_v2a, a_shift_v2a = _modulation(self.scale_shift_table_a2v_ca_audio[:4],
                                                                          a.cross_temb)
        (v_gate,) = _modulation(self.scale_shift_table_a2v_ca_video[4:], v.cross_gate)
        (a_gate,) = _modulation(self.scale_shift_table_a2v_ca_audio[4:], a.cross_gate)
        a2v = self.audio_to_video_attn(torch.addcmul(v_shift_a2v, vn, 1 + v_scale_a2v),
                                       torch.addcmul(a_shift_a2v, an, 1 + a_scale_a2v),
                                       rope=v.cross_rope, k_rope=a.cross_rope)
        v2a = self.video_to_audio_attn(torch.addcmul(a_shift_v2a, an, 1 + a_scale_v2a),
                                       torch.addcmul(v_shift_v2a, vn, 1 + v_scale_v2a),
                                       rope=a.cross_rope, k_rope=v.cross_rope)
        vx = torch.addcmul(vx, a2v, v_gate)
        ax = torch.addcmul(ax, v2a, a_gate)

        return _feed_forward(vx, self.ff, v_ada, self.eps), _feed_forward(ax, self.audio_ff, a_ada, self.eps)


class AudioDiT(nn.Module):
    """The LTX-2 DiT predicting the flow velocity v = eps - x0: audio-only by default, the joint
    audio-video transformer with `cfg.video` (then `forward_av`; `forward` stays the audio-only pass,
    as the reference given no video)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = cfg.grad_checkpointing
        if cfg.text_progress_theta and cfg.video:
            raise ValueError("text_progress_theta is for the audio-only DiT; the audio-video model has no progress rope")
        D = cfg.dim
        self.audio_patchify_proj = nn.Linear(cfg.in_channels, D)
        if cfg.caption_channels:
            self.audio_caption_projection = CaptionProjection(cfg.caption_channels, D)
        self.audio_adaln_single = AdaLNSingle(D, cfg.ada_rows)
        if cfg.cross_attention_adaln:
            self.audio_prompt_adaln_single = AdaLNSingle(D, 2)
        self.transformer_blocks = nn.ModuleList((AVBlock if cfg.video else AudioBlock)(cfg)
                                                for _ in range(cfg.num_layers))
        self.audio_scale_shift_table = nn.Parameter(torch.zeros(2, D))
        self.audio_proj_out = nn.Linear(D, cfg.in_channels)
        if cfg.video:
            Dv = cfg.video_dim
            self.patchify_proj = nn.Linear(cfg.video_in_channels, Dv)
            if cfg.caption_channels:
                self.caption_projection = CaptionProjection(cfg.caption_channels, Dv)
            self.adaln_single = AdaLNSingle(Dv, cfg.ada_rows)
            if cfg.cross_attention_adaln:
                self.prompt_adaln_single = AdaLNSingle(Dv, 2)
            self.scale_shift_table = nn.Parameter(torch.zeros(2, Dv))
            self.proj_out = nn.Linear(Dv, cfg.video_in_channels)
            # cross-modal AdaLN, each fed with the OTHER stream's sigma: scale/shift rows 0-3, gate row 4
            self.av_ca_video_scale_shift_adaln_single = AdaLNSingle(Dv, 4)
            self.av_ca_audio_scale_shift_adaln_single = AdaLNSingle(D, 4)
            self.av_ca_a2v_gate_adaln_single = AdaLNSingle(Dv, 1)
            self.av_ca_v2a_gate_adaln_single = AdaLNSingle(D, 1)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """adaLN-Zero init (DiT): zero modulation and output heads, so a fresh model starts at v = 0
        with every block an identity (the cross-modal attentions too: their gates start at 0);
        attention gates start at 2*sigmoid(0) = 1. Official checkpoints overwrite all of it."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        for name, p in self.named_parameters():
            if "scale_shift_table" in name:
                nn.init.zeros_(p)
        for name, m in self.named_modules():
            if name.endswith(("adaln_single.linear", "proj_out", "to_gate_logits")):
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    def _prepare(self, x, sigma, context, timesteps, positions, context_mask, attn_mask, video):
        """Patchify, embed sigma, project the text, build masks and rope for one stream.

        Returns (h (B, T, D), StreamInputs, embedded_t (B, Tt, D) for the output head).
        """
        cfg = self.cfg
        pre = "" if video else "audio_"
        B = x.shape[0]
        h = getattr(self, pre + "patchify_proj")(x)  # (B, T, D)
        dtype = h.dtype

        t = sigma[:, None] if timesteps is None else timesteps  # (B, Tt), Tt = 1 or T
        temb, embedded_t = getattr(self, pre + "adaln_single")(t.float().flatten() * cfg.timestep_scale, dtype)
        temb, embedded_t = temb.view(B, t.shape[1], -1), embedded_t.view(B, t.shape[1], -1)
        prompt_temb = None
        if cfg.cross_attention_adaln:  # always the per-sample sigma
            prompt_adaln = getattr(self, pre + "prompt_adaln_single")
            prompt_temb = prompt_adaln(sigma.float() * cfg.timestep_scale, dtype)[0].view(B, 1, -1)

        if cfg.caption_channels:
            context = getattr(self, pre + "caption_projection")(context)
        if context_mask is not None:
            # -max rather than -inf, as the reference: a sample with no valid token stays finite
            context_mask = _additive_mask(context_mask, dtype, -torch.finfo(dtype).max).view(B, 1, 1, -1)
        if attn_mask is not None:
            attn_mask = _additive_mask(attn_mask, dtype, torch.finfo(dtype).min)[:, None]  # (B|1, 1, T, T)

        if video:
            rope = split_rope(positions, cfg.video_rope_max_pos, cfg.video_dim, cfg.video_heads, cfg.rope_theta,
                              dtype, cfg.rope_double_precision)
        else:
            rope = split_rope(positions, cfg.rope_max_pos, cfg.dim, cfg.heads, cfg.rope_theta, dtype,
                              cfg.rope_double_precision)
        return h, StreamInputs(context, temb, prompt_temb, rope, attn_mask, context_mask), embedded_t

    def _head(self, h, embedded_t, video):
        """Output head: LayerNorm (no affine) modulated by the embedded timestep, then proj_out."""
        pre = "" if video else "audio_"
        shift, scale = (getattr(self, pre + "scale_shift_table").to(h.dtype) + embedded_t[:, :, None]).unbind(2)
        h = torch.addcmul(shift, F.layer_norm(h, (h.shape[-1],), eps=self.cfg.eps), 1 + scale)
        return getattr(self, pre + "proj_out")(h)

    def _text_rope(self, text_progress, audio_progress, audio_shape, text_len, dtype):
        """(query, key) cos/sin tables of the progress rope; None for a model without it (which ignores
        any progress it is given: the batches carry it whatever the model)."""
        cfg = self.cfg
        if not cfg.text_progress_theta:
            return None
        if text_progress is None or audio_progress is None:
            raise ValueError(f"this DiT aligns text by progress (text_progress_theta {cfg.text_progress_theta:g}): "
                             "forward needs text_progress and audio_progress")
        if tuple(audio_progress.shape) != tuple(audio_shape) or tuple(text_progress.shape) != (audio_shape[0], text_len):
            raise ValueError(f"audio_progress {tuple(audio_progress.shape)} / text_progress {tuple(text_progress.shape)}:"
                             f" expected {tuple(audio_shape)} / {(audio_shape[0], text_len)}")
        # positions in [0, 1] with max_pos 1: split_rope's 2*p-1 spans [-1, 1]
        table = lambda p: split_rope(p, 1.0, cfg.dim, cfg.heads, cfg.text_progress_theta, dtype,  # noqa: E731
                                     cfg.rope_double_precision)
        return table(audio_progress), table(text_progress)

    def _check_deltas(self, block_deltas, B, width):
        if block_deltas is not None and tuple(block_deltas.shape) != (B, self.cfg.num_layers, width):
            raise ValueError(f"block_deltas {tuple(block_deltas.shape)}: expected (B, num_layers, rows*D) = "
                             f"{(B, self.cfg.num_layers, width)}")

    def forward(self, x, sigma, context, *, timesteps=None, positions=None, context_mask=None, attn_mask=None,
                stg_blocks=(), block_deltas=None, stg_samples=None, text_progress=None, audio_progress=None):
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
        text_progress (B, L), audio_progress (B, T): each text token's and audio token's place in its
            utterance, 0..1 (`text.spoken_progress`, `audio_progress`); tokens outside the spoken words
            and the generated span (the prompt's description, registers, reference tokens) sit at
            PROGRESS_OUTSIDE. Needed with `cfg.text_progress_theta`, ignored without.
        """
        B, T, _ = x.shape
        if positions is None:
            positions = audio_positions(T, B, device=x.device)
        h, a, embedded_t = self._prepare(x, sigma, context, timesteps, positions, context_mask, attn_mask, False)
        self._check_deltas(block_deltas, B, a.temb.shape[-1])
        text_rope = self._text_rope(text_progress, audio_progress, (B, T), context.shape[1], h.dtype)
        stg_blocks = set(stg_blocks)
        for i, block in enumerate(self.transformer_blocks):
            block_temb = a.temb if block_deltas is None else a.temb + block_deltas[:, i, None].to(h.dtype)
            skip = (True if stg_samples is None else stg_samples) if i in stg_blocks else False
            args = (h, a.context, block_temb, a.prompt_temb, a.rope, a.attn_mask, a.context_mask, skip, text_rope)
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, *args, use_reentrant=False)
            else:
                h = block(*args)
        return self._head(h, embedded_t, video=False)

    def forward_av(self, video_x, audio_x, video_sigma, audio_sigma, video_context, audio_context, *,
                   video_positions, audio_positions=None, video_timesteps=None, audio_timesteps=None,
                   video_context_mask=None, audio_context_mask=None, video_attn_mask=None, audio_attn_mask=None,
                   video_stg_blocks=(), audio_stg_blocks=(), stg_samples=None, audio_block_deltas=None):
        """Joint pass: velocities (v_video (B, Tv, Cv), v_audio (B, Ta, C)), each stream at its own sigma.

        video_x (B, Tv, video_in_channels), audio_x (B, Ta, in_channels); video_sigma, audio_sigma
        (B,) drawn independently or shared; video_context (B, Lv, video_cross_attention_dim),
        audio_context (B, La, cross_attention_dim). video_positions (B, Tv, 3) (seconds, pixels,
        pixels; see `video_positions`); audio_positions (B, Ta) seconds, default `audio_positions`.
        Per-token timesteps, masks, STG (per stream) and audio_block_deltas as in `forward`.
        Each stream's cross-modal AdaLN is driven by the other stream's sigma (as ltx-core).
        """
        cfg = self.cfg
        if not cfg.video:
            raise ValueError("forward_av needs a model built with video=True "
                             "(e.g. preset 'ltx23_av' or load_dit(av=True))")
        B, Ta, _ = audio_x.shape
        if audio_positions is None:
            audio_positions = _default_audio_positions(Ta, B, device=audio_x.device)
        vh, v, v_emb = self._prepare(video_x, video_sigma, video_context, video_timesteps, video_positions,
                                     video_context_mask, video_attn_mask, True)
        ah, a, a_emb = self._prepare(audio_x, audio_sigma, audio_context, audio_timesteps, audio_positions,
                                     audio_context_mask, audio_attn_mask, False)
        dtype = vh.dtype
        # cross-modal rope: the time axis only, at the audio width (both attentions are audio-shaped),
        # each stream's channels grouped by its own head count (reference: `audio_cross_attention_dim`)
        rope_args = ([cfg.cross_rope_max_pos], cfg.dim)
        v.cross_rope = split_rope(video_positions[..., :1], *rope_args, cfg.video_heads, cfg.rope_theta, dtype,
                                  cfg.rope_double_precision)
        a.cross_rope = split_rope(audio_positions[..., None], *rope_args, cfg.heads, cfg.rope_theta, dtype,
                                  cfg.rope_double_precision)
        # per-sample cross-modal modulation of each stream, from the other stream's sigma; the gate
        # AdaLN sees sigma * av_ca_timestep_scale (the reference rescales the already scaled timestep)
        for s, other_sigma, pre in ((v, audio_sigma, "av_ca_video"), (a, video_sigma, "av_ca_audio")):
            t = other_sigma.float().view(B) * cfg.timestep_scale
            s.cross_temb = getattr(self, pre + "_scale_shift_adaln_single")(t, dtype)[0].view(B, 1, -1)
        t = audio_sigma.float().view(B) * cfg.timestep_scale * (cfg.av_ca_timestep_scale / cfg.timestep_scale)
        v.cross_gate = self.av_ca_a2v_gate_adaln_single(t, dtype)[0].view(B, 1, -1)
        t = video_sigma.float().view(B) * cfg.timestep_scale * (cfg.av_ca_timestep_scale / cfg.timestep_scale)
        a.cross_gate = self.av_ca_v2a_gate_adaln_single(t, dtype)[0].view(B, 1, -1)

        self._check_deltas(audio_block_deltas, B, a.temb.shape[-1])
        video_stg_blocks, audio_stg_blocks = set(video_stg_blocks), set(audio_stg_blocks)
        skip_on = True if stg_samples is None else stg_samples
        for i, block in enumerate(self.transformer_blocks):
            v_i = replace(v, skip=skip_on if i in video_stg_blocks else False)
            a_temb = a.temb if audio_block_deltas is None else a.temb + audio_block_deltas[:, i, None].to(dtype)
            a_i = replace(a, skip=skip_on if i in audio_stg_blocks else False, temb=a_temb)
            if self.grad_checkpointing and torch.is_grad_enabled():
                vh, ah = checkpoint(block.forward_av, vh, ah, v_i, a_i, use_reentrant=False)
            else:
                vh, ah = block.forward_av(vh, ah, v_i, a_i)
        return self._head(vh, v_emb, video=True), self._head(ah, a_emb, video=False)


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
# a key belongs to the audio-only model iff it contains one of these (tests/data/ltx23/audio_keys.tsv); 2.0 adds the caption projection
AUDIO_KEY_PARTS = ("audio_attn1", "audio_attn2", "audio_ff", "audio_patchify", "audio_proj_out",
                   "audio_adaln_single", "audio_prompt", "audio_scale_shift_table", "audio_caption_projection")


def is_audio_key(name):
    """True for a (prefix-stripped) transformer key of the audio-only DiT."""
    return any(part in name for part in AUDIO_KEY_PARTS)


def dit_config_from_metadata(config, video=False):
    """DiTConfig from a checkpoint's parsed metadata config (or its "transformer" part): the audio
    stream, plus with `video` the video stream and cross-modal settings of the AV transformer."""
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
        text_progress_theta=float(tc.get("text_progress_theta", 0.0)),  # this repo's own key, absent = off
        **(_video_config_from_metadata(tc) if video else {}),
    )


def _video_config_from_metadata(tc):
    """The DiTConfig video fields of an AV transformer config (defaults as ltx-core's configurator)."""
    if "num_attention_heads" not in tc:
        raise ValueError("transformer config has no video stream (no 'num_attention_heads'): audio-only model?")
    if not tc.get("use_audio_video_cross_attention", True):
        raise ValueError("use_audio_video_cross_attention=False: the streams are not coupled, not an LTX-2 AV model")
    return dict(
        video=True,
        video_heads=tc["num_attention_heads"],
        video_head_dim=tc.get("attention_head_dim", 128),
        video_in_channels=tc.get("in_channels", 128),
        video_cross_attention_dim=tc.get("cross_attention_dim", 4096),
        video_rope_max_pos=tuple(float(p) for p in tc.get("positional_embedding_max_pos", [20, 2048, 2048])),
        av_ca_timestep_scale=float(tc.get("av_ca_timestep_scale_multiplier", 1)),  # ltx-core's default is 1
    )


# The transformer-config keys of the official files that this architecture fixes. ltx-core's
# configurator (LTXModelConfigurator.from_config) refuses a file unless each has exactly this value.
FIXED_TRANSFORMER_CONFIG = {
    "dropout": 0.0, "attention_bias": True, "num_vector_embeds": None, "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000, "use_linear_projection": False, "only_cross_attention": False,
    "cross_attention_norm": True, "double_self_attention": False, "upcast_attention": False,
    "standardization_norm": "rms_norm", "norm_elementwise_affine": False, "qk_norm": "rms_norm",
    "positional_embedding_type": "rope", "use_audio_video_cross_attention": True, "share_ff": False,
    "av_cross_ada_norm": True, "use_middle_indices_grid": True, "attention_type": "default",
}


def metadata_from_dit_config(cfg):
    """Checkpoint metadata ({"config": JSON}) describing `cfg` in the official transformer-config
    vocabulary, complete enough for ltx-core's ModelLedger (and ComfyUI, diffusers) to build the
    model, for models that did not come from an official file."""
    tc = {
        **FIXED_TRANSFORMER_CONFIG,
        "norm_eps": cfg.eps,
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
        "stg_block": cfg.stg_block,
    }
    if cfg.text_progress_theta:  # only then: files of the official architecture keep its vocabulary
        tc["text_progress_theta"] = cfg.text_progress_theta
    if cfg.video:
        tc.update({
            "num_attention_heads": cfg.video_heads,
            "attention_head_dim": cfg.video_head_dim,
            "in_channels": cfg.video_in_channels,
            "out_channels": cfg.video_in_channels,
            "cross_attention_dim": cfg.video_cross_attention_dim,
            "positional_embedding_max_pos": list(cfg.video_rope_max_pos),
            "av_ca_timestep_scale_multiplier": cfg.av_ca_timestep_scale,
        })
    return {"config": json.dumps({"transformer": tc})}


def is_transformer_key(name):
    """True for a (prefix-stripped) key of the AV transformer itself, i.e. not of a text connector."""
    return "embeddings_connector" not in name


def load_dit(path, *, av=False, device="cpu", dtype=None, strict=True):
    """AudioDiT built from an official / merged LTX-2 checkpoint's own metadata.

    Default: the audio-only model; video, cross-modal and text-connector keys are skipped. av=True:
    the full audio-video transformer (`cfg.video`), text connectors skipped. Tensors are read one at
    a time into a model built on the meta device, so peak memory is the model itself. dtype
    defaults to the file's (that of `audio_patchify_proj.weight`). strict=False keeps a fresh init
    for missing keys.
    """
    path = os.fspath(path)
    try:
        cfg = dit_config_from_metadata(read_checkpoint_config(path), video=av)
    except BadFile:  # damaged or foreign file: its message says so
        raise
    except (KeyError, ValueError) as e:
        kind = "audio-video" if av else "audio"
        raise ValueError(f"{path}: cannot build the {kind} DiT from its metadata: {e}") from e
    state = load_prefixed_state(path, PREFIX, keep=is_transformer_key if av else is_audio_key, device=device,
                                dtype=dtype)
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
        raise ValueError(f"{path}: {'audio-video' if av else 'audio'} DiT weights do not match its config {cfg}:\n"
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
    """Write the model's weights in the official layout (`model.diffusion_model.` prefix), atomically,
    mode 0644; a NaN / Inf weight is refused (files.save_safetensors).

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
    save_safetensors(tensors, path, metadata=metadata)
