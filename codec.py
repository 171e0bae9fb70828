"""The audio codec: everything between a waveform and the (B, T, latent_dim) tokens the DiT sees.

Two codecs with one interface (`sample_rate`, `output_rate`, `channels`, `latent_dim`,
`tokens_per_second`, `encode`, `decode`, `num_tokens`, `grad_checkpointing`):

- `LTXAudioCodec`: the LTX-2 audio VAE (stereo log-mel -> causal 2D conv encoder -> [8, T, 16]
  latent -> 128 features per token, `c*16+f`, normalised by `per_channel_statistics`) and its
  vocoder: LTX-2.3 BigVGAN-style with SnakeBeta + bandwidth extension to 48 kHz, or LTX-2.0
  HiFi-GAN-style at 24 kHz, chosen by the checkpoint metadata. Module and buffer names equal the
  official checkpoint's `audio_vae.*` / `vocoder.*` keys, so the state dict loads strictly.
  Checked against ltx-core 1.0.0 in tests/test_codec.py.
- `MelCodec`: normalised log-mel frames grouped 4 to a token (25 tokens/s), decoded by a
  pseudo-inverse mel filterbank + Griffin-Lim; optionally each token projected onto the leading
  principal components of a training set's tokens (`fit_mel_basis`, a "basis" file), so a finer
  filterbank fits the same latent width. No network; for small and CPU runs.

Round-trip a file to hear what the codec does to your data before training:

    python -m codec in.wav out.wav [--codec mel|ltx --ckpt ltx-2.3.safetensors]
"""

import argparse
import dataclasses
import functools
import hashlib
import json
import math

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
import torchaudio.functional as AF
from torch import nn
from torch.utils.checkpoint import checkpoint

from audio import SAMPLE_RATE, resample
from files import (load_prefixed_state, load_safetensors, read_checkpoint_config, read_safetensors_metadata,
                   save_safetensors)

# ------------------------------------------------------------------------------------------------
# Audio IO


# Downmix to stereo with ITU-R BS.775 coefficients (centre and surrounds at -3 dB, LFE dropped),
# rows rescaled to sum to 1 so a full-scale input cannot clip. Channel order is the WAV/SMPTE one.
_M3DB = 1 / math.sqrt(2)
_DOWNMIX = {
    6: [[1, 0, _M3DB, 0, _M3DB, 0],  # 5.1: FL FR FC LFE BL BR
        [0, 1, _M3DB, 0, 0, _M3DB]],
    8: [[1, 0, _M3DB, 0, _M3DB, 0, _M3DB, 0],  # 7.1: FL FR FC LFE BL BR SL SR
        [0, 1, _M3DB, 0, 0, _M3DB, 0, _M3DB]],
}


def to_channels(wav, channels):
    """Return `wav` (..., C, N) with `channels` channels.

    Mono is duplicated to stereo (the LTX VAE takes stereo only); 5.1 and 7.1 are downmixed with
    ITU coefficients; to mono is the mean of the channels; other layouts are mixed to mono first.
    """
    c = wav.shape[-2]
    if c == channels:
        return wav
    if channels == 1:
        return wav.mean(-2, keepdim=True)
    if channels != 2:
        raise ValueError(f"cannot convert {c}-channel audio to {channels} channels")
    if c in _DOWNMIX:
        m = torch.tensor(_DOWNMIX[c], dtype=wav.dtype, device=wav.device)
        return (m / m.sum(1, keepdim=True)) @ wav  # (2, C) @ (..., C, N)
    return wav.mean(-2, keepdim=True).expand(*wav.shape[:-2], 2, wav.shape[-1]).contiguous()


def load_audio(path, sample_rate, channels=None):
    """Read an audio file with soundfile -> (C, N) float32 at `sample_rate`.

    `channels` (1 or 2) converts with `to_channels`; None keeps the file's channels. Unreadable,
    empty and non-finite audio raise ValueError naming the file.
    """
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (N, C)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, TypeError, ...
        raise ValueError(f"{path}: cannot read audio ({e})") from None
    if data.shape[0] == 0:
        raise ValueError(f"{path}: audio is empty (0 samples)")
    if not np.isfinite(data).all():
        raise ValueError(f"{path}: audio contains NaN or Inf samples")
    wav = resample(torch.from_numpy(np.ascontiguousarray(data.T)), rate, sample_rate)  # (C, N)
    if channels is not None:
        wav = to_channels(wav, channels)
    return wav.contiguous()


def log_mel(wav, sample_rate, n_fft, hop_length, mel_fb):
    """log(clamp(mel, 1e-5)) of a magnitude (power 1) STFT -> (B, C, frames, n_mels).

    Centred, reflect-padded Hann STFT as ltx-core's AudioProcessor (torchaudio MelSpectrogram):
    N samples give N // hop + 1 frames. `mel_fb` (n_freqs, n_mels) from torchaudio.
    """
    if wav.shape[-1] <= n_fft // 2:
        raise ValueError(f"audio of {wav.shape[-1]} samples is too short: the centred STFT needs "
                         f"more than n_fft/2 = {n_fft // 2} samples ({n_fft / 2 / sample_rate:.3f} s)")
    window = torch.hann_window(n_fft, device=wav.device, dtype=wav.dtype)
    spec = AF.spectrogram(wav, pad=0, window=window, n_fft=n_fft, hop_length=hop_length,
                          win_length=n_fft, power=1.0, normalized=False)  # (B, C, n_freqs, frames)
    mel = torch.matmul(spec.transpose(-1, -2), mel_fb.to(spec))  # (B, C, frames, n_mels)
    return torch.log(torch.clamp(mel, min=1e-5))


def slaney_mel_fb(n_fft, n_mels, sample_rate):
    """Slaney-scale, Slaney-normalised mel filterbank over 0..sr/2 -> (n_fft//2+1, n_mels).

    Always computed on the CPU, so a model built on the meta device still gets real values."""
    with torch.device("cpu"):
        return AF.melscale_fbanks(n_fft // 2 + 1, 0.0, sample_rate / 2.0, n_mels, sample_rate,
                                  norm="slaney", mel_scale="slaney")


def _ckpt(fn, x, enabled):
    """fn(x), recomputed in the backward pass when `enabled` and autograd is recording."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, x, use_reentrant=False)
    return fn(x)


# ------------------------------------------------------------------------------------------------
# Audio VAE (ltx-core `audio_vae`): causal along time (the "height" axis of (B, C, T, F))


def pixel_norm(x, eps=1e-6):
    """Parameter-free RMS norm over channels at every (t, f) position."""
    return x / torch.sqrt(x.pow(2).mean(1, keepdim=True) + eps)


class CausalConv2d(nn.Module):
    """Conv2d padded k-1 on the past side of time and symmetrically along frequency."""

    def __init__(self, in_ch, out_ch, kernel_size):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size)
        p = kernel_size - 1
        self.padding = (p // 2, p - p // 2, p, 0)  # (f_left, f_right, t_past, t_future)

    def forward(self, x):
        return self.conv(F.pad(x, self.padding))


class ResnetBlock(nn.Module):
    """pixel norm -> SiLU -> conv, twice, plus a 1x1 shortcut when the width changes."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.conv1 = CausalConv2d(in_ch, out_ch, 3)
        self.conv2 = CausalConv2d(out_ch, out_ch, 3)
        if in_ch != out_ch:
            self.nin_shortcut = CausalConv2d(in_ch, out_ch, 1)

    def forward(self, x):
        h = self.conv1(F.silu(pixel_norm(x)))
        h = self.conv2(F.silu(pixel_norm(h)))  # dropout is 0 in every released config
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv; 2 rows of past padding keep it causal: T -> ceil(T/2), F -> F/2."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 2, 0)))


class Upsample(nn.Module):
    """Nearest x2 then a causal conv; the first time row (which sees only padding and the first
    input row twice) is dropped, so T -> 2T - 1 undoes the encoder's ceil(T/2)."""

    def __init__(self, ch):
        super().__init__()
        self.conv = CausalConv2d(ch, ch, 3)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))[:, :, 1:]


class Level(nn.Module):
    """One resolution of the encoder (`down.i`) or decoder (`up.i`): res blocks, then resampling."""

    def __init__(self, widths, resample=None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(a, b) for a, b in zip(widths[:-1], widths[1:]))
        if resample == "down":
            self.downsample = Downsample(widths[-1])
        elif resample == "up":
            self.upsample = Upsample(widths[-1])


class Mid(nn.Module):
    """Two res blocks at the lowest resolution (no attention in any released config)."""

    def __init__(self, ch):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch)
        self.block_2 = ResnetBlock(ch, ch)

    def forward(self, x):
        return self.block_2(self.block_1(x))


class AudioEncoder(nn.Module):
    """(B, in_ch, T_mel, mel_bins) log-mel -> (B, 2*z, ceil(T_mel/4), mel_bins/4) [mean, logvar]."""

    def __init__(self, ch, ch_mult, num_res_blocks, in_channels, z_channels, double_z):
        super().__init__()
        self.conv_in = CausalConv2d(in_channels, ch, 3)
        widths = [ch] + [ch * m for m in ch_mult]
        self.down = nn.ModuleList(
            Level([widths[i]] + [widths[i + 1]] * num_res_blocks,
                  "down" if i < len(ch_mult) - 1 else None)
            for i in range(len(ch_mult)))
        self.mid = Mid(widths[-1])
        self.conv_out = CausalConv2d(widths[-1], 2 * z_channels if double_z else z_channels, 3)

    def forward(self, x, grad_checkpointing=False):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = _ckpt(block, h, grad_checkpointing)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(pixel_norm(h)))


class AudioDecoder(nn.Module):
    """(B, z, T, mel_bins/4) latent -> (B, out_ch, 4T - 3, mel_bins) log-mel."""

    def __init__(self, ch, ch_mult, num_res_blocks, out_ch, z_channels, mel_bins):
        super().__init__()
        self.out_ch, self.mel_bins, self.factor = out_ch, mel_bins, 2 ** (len(ch_mult) - 1)
        self.conv_in = CausalConv2d(z_channels, ch * ch_mult[-1], 3)
        self.mid = Mid(ch * ch_mult[-1])
        # up[i] runs at resolution i (0 = finest) and is applied from the coarsest down; its
        # first block takes the width of the level below it in the pass (ch*ch_mult[i+1]).
        self.up = nn.ModuleList(
            Level([ch * ch_mult[min(i + 1, len(ch_mult) - 1)]] + [ch * ch_mult[i]] * (num_res_blocks + 1),
                  "up" if i > 0 else None)
            for i in range(len(ch_mult)))
        self.conv_out = CausalConv2d(ch * ch_mult[0], out_ch, 3)

    def forward(self, z, grad_checkpointing=False):
        frames = max(z.shape[2] * self.factor - (self.factor - 1), 1)  # causal: 4T - 3
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = _ckpt(block, h, grad_checkpointing)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        h = self.conv_out(F.silu(pixel_norm(h)))
        # The conv stack already yields `frames` x mel_bins; crop / zero-pad covers odd configs.
        h = h[:, :self.out_ch, :frames, :self.mel_bins]
        return F.pad(h, (0, self.mel_bins - h.shape[3], 0, frames - h.shape[2]))


class PerChannelStatistics(nn.Module):
    """Dataset mean and std of each of the 128 patchified latent features (from the checkpoint)."""

    def __init__(self, dim):
        super().__init__()
        self.register_buffer("std-of-means", torch.ones(dim))
        self.register_buffer("mean-of-means", torch.zeros(dim))

    def normalize(self, x):
        return (x - self.get_buffer("mean-of-means").to(x)) / self.get_buffer("std-of-means").to(x)

    def un_normalize(self, x):
        return x * self.get_buffer("std-of-means").to(x) + self.get_buffer("mean-of-means").to(x)


class AudioVAE(nn.Module):
    """`audio_vae.{encoder,decoder,per_channel_statistics}`; latents cross it as (B, T, z*F)."""

    def __init__(self, ch, ch_mult, num_res_blocks, in_channels, out_ch, z_channels, double_z, mel_bins):
        super().__init__()
        self.z_channels = z_channels
        self.latent_bins = mel_bins // 2 ** (len(ch_mult) - 1)  # 64 mel bins -> 16
        self.encoder = AudioEncoder(ch, ch_mult, num_res_blocks, in_channels, z_channels, double_z)
        self.decoder = AudioDecoder(ch, ch_mult, num_res_blocks, out_ch, z_channels, mel_bins)
        self.per_channel_statistics = PerChannelStatistics(z_channels * self.latent_bins)

    def encode(self, mel, grad_checkpointing=False):
        """(B, C, T_mel, mel_bins) log-mel -> (B, T, z*F) normalised posterior mean."""
        mean = self.encoder(mel, grad_checkpointing)[:, :self.z_channels]  # (B, 8, T, 16)
        tokens = mean.permute(0, 2, 1, 3).flatten(2)  # (B, T, 128), feature c*16 + f
        return self.per_channel_statistics.normalize(tokens)

    def decode(self, latents, grad_checkpointing=False):
        """(B, T, z*F) normalised latents -> (B, out_ch, 4T - 3, mel_bins) log-mel."""
        z = self.per_channel_statistics.un_normalize(latents)
        z = z.unflatten(2, (self.z_channels, self.latent_bins)).permute(0, 2, 1, 3)  # (B, 8, T, 16)
        return self.decoder(z, grad_checkpointing)


# ------------------------------------------------------------------------------------------------
# Vocoders (ltx-core `vocoder`): HiFi-GAN (LTX-2.0) and BigVGAN v2 + bandwidth extension (LTX-2.3)


def kaiser_sinc_filter(cutoff, half_width, kernel_size):
    """Kaiser-windowed sinc low-pass with unit DC gain (BigVGAN's anti-alias filter) -> (1, 1, K).

    `cutoff` and `half_width` are in cycles per sample; beta follows Kaiser's empirical formula
    for the stop-band attenuation that the transition width buys.
    """
    return _kaiser_sinc_filter(cutoff, half_width, kernel_size).clone()


@functools.lru_cache
def _kaiser_sinc_filter(cutoff, half_width, kernel_size):
    # Cached and on the CPU: a 2.3 vocoder holds hundreds of copies, and they must be real
    # values even when the model is built on the meta device.
    half = kernel_size // 2
    atten = 2.285 * (half - 1) * math.pi * 4 * half_width + 7.95  # dB
    if atten > 50.0:
        beta = 0.1102 * (atten - 8.7)
    elif atten >= 21.0:
        beta = 0.5842 * (atten - 21) ** 0.4 + 0.07886 * (atten - 21.0)
    else:
        beta = 0.0
    with torch.device("cpu"):
        window = torch.kaiser_window(kernel_size, periodic=False, beta=beta)
        if kernel_size % 2 == 0:  # taps sit between samples
            t = torch.arange(-half, half) + 0.5
        else:
            t = torch.arange(kernel_size) - half
        taps = 2 * cutoff * window * torch.sinc(2 * cutoff * t)
        return (taps / taps.sum()).view(1, 1, kernel_size)


def hann_sinc_filter(ratio, lowpass_filter_width=6, rolloff=0.99):
    """The Hann-windowed sinc that torchaudio.functional.resample uses for x`ratio` -> (1, 1, K)."""
    width = math.ceil(lowpass_filter_width / rolloff)
    t = (torch.arange(2 * width * ratio + 1) / ratio - width) * rolloff
    window = torch.cos(t.clamp(-lowpass_filter_width, lowpass_filter_width) * math.pi / lowpass_filter_width / 2) ** 2
    return (torch.sinc(t) * window * rolloff / ratio).view(1, 1, -1)


class UpSample1d(nn.Module):
    """Zero-stuff by `ratio` and low-pass (a transposed depthwise conv), replicate-padded edges.

    window "kaiser": BigVGAN's anti-aliasing upsampler (filter stored in the checkpoint);
    "hann": torchaudio's resampling filter (the BWE skip path; not in the checkpoint).
    """

    def __init__(self, ratio=2, kernel_size=12, window="kaiser"):
        super().__init__()
        self.ratio = ratio
        if window == "kaiser":
            taps = kaiser_sinc_filter(0.5 / ratio, 0.6 / ratio, kernel_size)
            self.pad = kernel_size // ratio - 1
            self.crop = (self.pad * ratio + (kernel_size - ratio) // 2,
                         self.pad * ratio + (kernel_size - ratio + 1) // 2)
        else:
            with torch.device("cpu"):  # not in the checkpoint: real values even on a meta build
                taps = hann_sinc_filter(ratio)
            kernel_size = taps.shape[-1]
            self.pad = (kernel_size - 1) // (2 * ratio)
            self.crop = (2 * self.pad * ratio, kernel_size - ratio)
        self.register_buffer("filter", taps, persistent=window == "kaiser")

    def forward(self, x):  # (B, C, N) -> (B, C, ratio*N)
        c = x.shape[1]
        x = F.pad(x, (self.pad, self.pad), mode="replicate")
        x = self.ratio * F.conv_transpose1d(x, self.filter.to(x).expand(c, -1, -1), stride=self.ratio, groups=c)
        return x[..., self.crop[0]:-self.crop[1]]


class LowPassFilter1d(nn.Module):
    """Replicate-padded depthwise Kaiser-sinc low-pass with a stride."""

    def __init__(self, cutoff, half_width, stride, kernel_size):
        super().__init__()
        self.stride = stride
        self.pad = (kernel_size // 2 - int(kernel_size % 2 == 0), kernel_size // 2)
        self.register_buffer("filter", kaiser_sinc_filter(cutoff, half_width, kernel_size))

    def forward(self, x):
        c = x.shape[1]
        x = F.pad(x, self.pad, mode="replicate")
        return F.conv1d(x, self.filter.to(x).expand(c, -1, -1), stride=self.stride, groups=c)


class DownSample1d(nn.Module):
    """Anti-aliased decimation by `ratio`."""

    def __init__(self, ratio=2, kernel_size=12):
        super().__init__()
        self.lowpass = LowPassFilter1d(0.5 / ratio, 0.6 / ratio, ratio, kernel_size)

    def forward(self, x):
        return self.lowpass(x)


class SnakeBeta(nn.Module):
    """x + sin^2(alpha x) / beta per channel; alpha, beta stored as logs (BigVGAN v2)."""

    def __init__(self, channels):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x):  # (B, C, N)
        alpha, beta = self.alpha.exp()[:, None], self.beta.exp()[:, None]
        return x + torch.sin(x * alpha).pow(2) / (beta + 1e-9)


class Activation1d(nn.Module):
    """SnakeBeta at twice the sample rate, so its harmonics do not alias."""

    def __init__(self, channels):
        super().__init__()
        self.act = SnakeBeta(channels)
        self.upsample = UpSample1d(2, 12)
        self.downsample = DownSample1d(2, 12)

    def forward(self, x):
        return self.downsample(self.act(self.upsample(x)))


def _same_conv(ch, kernel_size, dilation):
    return nn.Conv1d(ch, ch, kernel_size, dilation=dilation, padding=(kernel_size - 1) * dilation // 2)


class ResBlock1(nn.Module):
    """HiFi-GAN resblock: x += conv(lrelu(conv_dilated(lrelu(x)))) for each dilation."""

    def __init__(self, ch, kernel_size, dilations):
        super().__init__()
        self.convs1 = nn.ModuleList(_same_conv(ch, kernel_size, d) for d in dilations)
        self.convs2 = nn.ModuleList(_same_conv(ch, kernel_size, 1) for _ in dilations)

    def forward(self, x):
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, 0.1)), 0.1))
        return x


class AMPBlock1(nn.Module):
    """BigVGAN v2 resblock: as ResBlock1 with anti-aliased SnakeBeta in place of leaky ReLU."""

    def __init__(self, ch, kernel_size, dilations):
        super().__init__()
        self.convs1 = nn.ModuleList(_same_conv(ch, kernel_size, d) for d in dilations)
        self.convs2 = nn.ModuleList(_same_conv(ch, kernel_size, 1) for _ in dilations)
        self.acts1 = nn.ModuleList(Activation1d(ch) for _ in dilations)
        self.acts2 = nn.ModuleList(Activation1d(ch) for _ in dilations)

    def forward(self, x):
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.acts1, self.acts2):
            x = x + c2(a2(c1(a1(x))))
        return x


# Defaults of a vocoder config section where a key is absent (ltx-core 1.0.0 `_vocoder_from_config`).
VOCODER_DEFAULTS = dict(resblock_kernel_sizes=[3, 7, 11], upsample_rates=[6, 5, 2, 2, 2],
                        upsample_kernel_sizes=[16, 15, 8, 4, 4],
                        resblock_dilation_sizes=[[1, 3, 5], [1, 3, 5], [1, 3, 5]],
                        upsample_initial_channel=1024, resblock="1", output_sampling_rate=24000,
                        activation="snake", use_tanh_at_final=True, use_bias_at_final=True)


class Vocoder(nn.Module):
    """Mel -> waveform generator: (B, 2, T, mel_bins) -> (B, 2, T * prod(upsample_rates)).

    resblock "1": HiFi-GAN (leaky ReLU; the LTX-2.0 vocoder). "AMP1": BigVGAN v2 with SnakeBeta
    (both LTX-2.3 generators). `final` is "tanh", "clamp" (to [-1, 1]) or "none".
    """

    def __init__(self, cfg, final, in_channels=128):
        super().__init__()
        cfg = {**VOCODER_DEFAULTS, **cfg}
        if cfg["resblock"] not in ("1", "AMP1"):
            raise ValueError(f"vocoder resblock {cfg['resblock']!r} is not supported (expected '1' or 'AMP1')")
        self.amp = cfg["resblock"] == "AMP1"
        if self.amp and cfg["activation"] != "snakebeta":
            raise ValueError(f"AMP1 vocoder activation {cfg['activation']!r} is not supported (expected 'snakebeta')")
        self.final = final
        ch0, rates = cfg["upsample_initial_channel"], cfg["upsample_rates"]
        self.num_kernels = len(cfg["resblock_kernel_sizes"])
        self.conv_pre = nn.Conv1d(in_channels, ch0, 7, padding=3)  # 2 channels x 64 mel bins in
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(ch0 >> i, ch0 >> (i + 1), k, s, padding=(k - s) // 2)
            for i, (s, k) in enumerate(zip(rates, cfg["upsample_kernel_sizes"], strict=True)))
        block = AMPBlock1 if self.amp else ResBlock1
        self.resblocks = nn.ModuleList(
            block(ch0 >> (i + 1), k, d)
            for i in range(len(rates))
            for k, d in zip(cfg["resblock_kernel_sizes"], cfg["resblock_dilation_sizes"], strict=True))
        ch_out = ch0 >> len(rates)
        if self.amp:
            self.act_post = Activation1d(ch_out)
        self.conv_post = nn.Conv1d(ch_out, 2, 7, padding=3, bias=cfg["use_bias_at_final"])

    def stage(self, i):
        """Upsample i and its multi-receptive-field fusion (mean of the resblocks), as a function."""
        def run(x):
            if not self.amp:
                x = F.leaky_relu(x, 0.1)
            x = self.ups[i](x)
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            return sum(b(x) for b in blocks) / self.num_kernels
        return run

    def forward(self, mel, grad_checkpointing=False):
        x = mel.transpose(2, 3).flatten(1, 2)  # (B, 2, T, M) -> (B, 2*M, T), stereo-major
        x = self.conv_pre(x)
        for i in range(len(self.ups)):
            x = _ckpt(self.stage(i), x, grad_checkpointing)
        # HiFi-GAN's last activation is nn.LeakyReLU() with its default slope 0.01, not 0.1.
        x = self.act_post(x) if self.amp else F.leaky_relu(x, 0.01)
        x = self.conv_post(x)
        if self.final == "tanh":
            return torch.tanh(x)
        if self.final == "clamp":
            return torch.clamp(x, -1, 1)
        return x


class STFTBasis(nn.Module):
    """Causal magnitude STFT as a strided conv with windowed-DFT rows loaded from the checkpoint
    (`forward_basis`: real rows then imaginary rows; `inverse_basis` is stored but unused)."""

    def __init__(self, n_fft, hop_length):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        n_freqs = n_fft // 2 + 1
        # Until the checkpoint overwrites it: a periodic-Hann windowed DFT, a working default.
        k, n = torch.arange(n_freqs)[:, None], torch.arange(n_fft)[None]
        angle = 2 * math.pi * k * n / n_fft
        window = torch.hann_window(n_fft)
        basis = torch.cat([torch.cos(angle) * window, -torch.sin(angle) * window])[:, None]
        self.register_buffer("forward_basis", basis)  # (2*n_freqs, 1, n_fft)
        self.register_buffer("inverse_basis", torch.zeros_like(basis))

    def forward(self, y):  # (B, N) -> (B, n_freqs, N // hop)
        y = F.pad(y[:, None], (self.n_fft - self.hop_length, 0))  # past-only padding: no lookahead
        spec = F.conv1d(y, self.forward_basis.to(y), stride=self.hop_length)
        re, im = spec.chunk(2, dim=1)
        # The clamp (far below the 1e-5 mel floor) keeps sqrt's gradient finite on silent frames.
        return torch.sqrt(torch.clamp(re.pow(2) + im.pow(2), min=1e-20))


class MelSTFT(nn.Module):
    """`mel_stft`: causal log-mel of the 16 kHz vocoder output, the input of the BWE generator."""

    def __init__(self, n_fft, hop_length, n_mels, sample_rate):
        super().__init__()
        self.stft_fn = STFTBasis(n_fft, hop_length)
        self.register_buffer("mel_basis", slaney_mel_fb(n_fft, n_mels, sample_rate).T.contiguous())

    def forward(self, y):  # (B, N) -> (B, n_mels, N // hop)
        mel = torch.matmul(self.mel_basis.to(y), self.stft_fn(y))
        return torch.log(torch.clamp(mel, min=1e-5))


class VocoderWithBWE(nn.Module):
    """LTX-2.3: 16 kHz BigVGAN vocoder, then bandwidth extension to 48 kHz: a second generator
    maps the causal mel of the 16 kHz output to a residual added to its sinc x3 upsampling."""

    def __init__(self, voc_cfg, bwe_cfg, in_channels=128):
        super().__init__()
        self.input_rate, self.output_rate = bwe_cfg["input_sampling_rate"], bwe_cfg["output_sampling_rate"]
        self.hop_length = bwe_cfg["hop_length"]
        self.vocoder = Vocoder(voc_cfg, "tanh" if voc_cfg.get("use_tanh_at_final", True) else "clamp", in_channels)
        self.bwe_generator = Vocoder(bwe_cfg, "none", 2 * bwe_cfg["num_mels"])
        self.mel_stft = MelSTFT(bwe_cfg["n_fft"], self.hop_length, bwe_cfg["num_mels"], self.input_rate)
        self.resampler = UpSample1d(self.output_rate // self.input_rate, window="hann")

    def forward(self, mel, grad_checkpointing=False):  # (B, 2, T, M) -> (B, 2, 3 * 160 * T)
        x = self.vocoder(mel, grad_checkpointing)  # (B, 2, N16)
        b, c, n = x.shape
        x = F.pad(x, (0, -n % self.hop_length))  # whole mel frames
        bwe_mel = self.mel_stft(x.flatten(0, 1)).unflatten(0, (b, c))  # (B, 2, M, F)
        residual = self.bwe_generator(bwe_mel.transpose(2, 3), grad_checkpointing)
        out = torch.clamp(residual + self.resampler(x), -1, 1)
        return out[..., :n * self.output_rate // self.input_rate]


# ------------------------------------------------------------------------------------------------
# The codecs


class LTXAudioCodec(nn.Module):
    """LTX-2 audio VAE + vocoder built from a checkpoint's metadata config.

    `config` holds the `audio_vae` and `vocoder` sections of `__metadata__["config"]`. The state
    dict keys are exactly the official `audio_vae.*` and `vocoder.*` ones.
    """

    def __init__(self, config):
        super().__init__()
        for section in ("audio_vae", "vocoder"):
            if section not in config:
                raise ValueError(f"LTX codec config has no '{section}' section")
        vae = config["audio_vae"]
        params = vae.get("model", {}).get("params", {})
        dd = params.get("ddconfig", {})
        stft = vae.get("preprocessing", {}).get("stft", {})
        mel_bins = dd.get("mel_bins") or vae.get("preprocessing", {}).get("mel", {}).get("n_mel_channels") or 64
        ch_mult = list(dd.get("ch_mult", [1, 2, 4]))
        # ltx-core's defaults where a key is absent; attention appears at a level whose
        # resolution (256, 128, ... in its bookkeeping) is listed in attn_resolutions.
        resolutions = {dd.get("resolution", 256) // 2 ** i for i in range(len(ch_mult))}
        attn_levels = sorted(resolutions & set(dd.get("attn_resolutions", [8, 16, 32])))
        unsupported = {"norm_type": (dd.get("norm_type", "pixel"), "pixel"),
                       "causality_axis": (dd.get("causality_axis", "height"), "height"),
                       "causal": (stft.get("causal", True), True),
                       "attn_resolutions": (attn_levels, []),
                       "mid_block_add_attention": (dd.get("mid_block_add_attention", True), False)}
        for key, (got, want) in unsupported.items():
            if got != want:
                raise ValueError(f"audio_vae config {key}={got!r} is not supported (only {want!r}, "
                                 f"as in every released LTX-2 checkpoint)")
        self.audio_vae = AudioVAE(ch=dd.get("ch", 128), ch_mult=ch_mult,
                                  num_res_blocks=dd.get("num_res_blocks", 2),
                                  in_channels=dd.get("in_channels", 2), out_ch=dd.get("out_ch", 2),
                                  z_channels=dd.get("z_channels", 8), double_z=dd.get("double_z", True),
                                  mel_bins=mel_bins)
        voc = config["vocoder"]
        voc_in = dd.get("out_ch", 2) * mel_bins
        if "bwe" in voc:  # LTX-2.3: {"vocoder": {...}, "bwe": {...}}
            self.vocoder = VocoderWithBWE(voc.get("vocoder", {}), voc["bwe"], voc_in)
            self.output_rate = voc["bwe"]["output_sampling_rate"]
        else:  # LTX-2.0: one flat HiFi-GAN section
            self.vocoder = Vocoder(voc, "tanh" if voc.get("use_tanh_at_final", True) else "clamp", voc_in)
            self.output_rate = voc.get("output_sampling_rate", 24000)
        self.config = {"audio_vae": vae, "vocoder": voc}
        self.sample_rate = params.get("sampling_rate", SAMPLE_RATE)
        self.n_fft = stft.get("filter_length", 1024)
        self.hop_length = stft.get("hop_length", 160)
        self.mel_bins = mel_bins
        self.channels = dd.get("in_channels", 2)
        self.time_factor = 2 ** (len(ch_mult) - 1)
        self.latent_dim = self.audio_vae.z_channels * self.audio_vae.latent_bins
        self.tokens_per_second = self.sample_rate // (self.hop_length * self.time_factor)  # 25
        self.grad_checkpointing = False
        self.register_buffer("mel_fb", slaney_mel_fb(self.n_fft, mel_bins, self.sample_rate), persistent=False)

    def num_tokens(self, num_samples):
        """Latent length for `num_samples` at `sample_rate`: N // hop + 1 mel frames (centred
        STFT), then each causal stride-2 conv gives ceil(T/2). For 16 kHz: N // 640 + 1."""
        frames = num_samples // self.hop_length + 1
        return -(-frames // self.time_factor)

    def encode(self, wav):
        """(B, C, N) waveform at `sample_rate` -> (B, T, latent_dim) fp32 normalised latent mean."""
        if next(self.audio_vae.encoder.parameters()).dtype != torch.float32:
            raise ValueError("LTXAudioCodec.encode runs in fp32, as the reference: keep the codec in fp32")
        wav = to_channels(wav.float(), self.channels)
        with torch.autocast(wav.device.type, enabled=False):
            mel = log_mel(wav, self.sample_rate, self.n_fft, self.hop_length, self.mel_fb.float())
            return self.audio_vae.encode(mel, self.grad_checkpointing)  # (B, T, 128)

    def decode(self, latents):
        """(B, T, latent_dim) normalised latents -> (B, 2, N_out) at `output_rate`, differentiable.

        N_out = (4T - 3) * 160 * output_rate / SAMPLE_RATE. With `grad_checkpointing` set, each res
        block and vocoder stage is recomputed in the backward pass instead of stored.
        """
        dtype = next(self.vocoder.parameters()).dtype
        mel = self.audio_vae.decode(latents.to(dtype), self.grad_checkpointing)  # (B, 2, 4T-3, 64)
        return self.vocoder(mel, self.grad_checkpointing)

    def decode_16k(self, latents):
        """(B, T, latent_dim) -> (B, 2, N) at 16 kHz, differentiable: what the ReFL scorers take.

        LTX-2.3's vocoder makes 16 kHz first and extends the bandwidth to 48 kHz after; the scorers
        only hear up to 8 kHz, so this stops before the extension (its generator, mel and x3
        resampler cost more than the 16 kHz vocoder's last stages). Other vocoders are resampled.
        """
        if not isinstance(self.vocoder, VocoderWithBWE):
            return resample(self.decode(latents), self.output_rate, SAMPLE_RATE)
        dtype = next(self.vocoder.parameters()).dtype
        mel = self.audio_vae.decode(latents.to(dtype), self.grad_checkpointing)
        return resample(self.vocoder.vocoder(mel, self.grad_checkpointing), self.vocoder.input_rate, SAMPLE_RATE)

    def settings(self):
        """What, besides the weights, determines `encode`'s output (for `codec_fingerprint`)."""
        return {"codec": "ltx", "audio_vae": self.config["audio_vae"]}

    def encode_state(self):
        """The tensors `encode` depends on: the encoder and the latent statistics."""
        return {k: v for k, v in self.state_dict().items()
                if k.startswith(("audio_vae.encoder.", "audio_vae.per_channel_statistics."))}


class MelCodec(nn.Module):
    """Normalised log-mel "latents": 4 frames of `n_mels` bins per 25 Hz token, mono.

    Features are (log(clamp(mel, 1e-5)) - mean) / std with FIXED constants `mean`, `std`, not
    fitted to data (a cache stays valid until they change; both enter the fingerprint). The
    defaults map digital silence (log 1e-5 = -11.5) to -2.2 and the peak bin of a full-scale
    1 kHz tone (+0.8) to +2.7; the speech-like test signal (peak 0.3) has mean -6.4, std 1.6.
    Decoded with the pseudo-inverse of the mel filterbank (torchaudio InverseMelScale's
    least-squares solution) and Griffin-Lim.

    With a `basis` ({"mean": (4 n_mels,), "components": (D, 4 n_mels) orthonormal rows, "scale": (1,) or (D,)},
    or the path of a file `save_mel_basis` wrote) each token of 4 n_mels features is centred,
    projected onto the D components and divided by `scale`: latent_dim = D. Decoding maps back
    (the part of the token outside the components is lost, ~0.6 % of the variance for 64 mels -> 128).
    The 32 Slaney mel bands are ~90 Hz apart below 1 kHz: the harmonics of a voice pitched at 100-150
    Hz fall two to a band and the codec loses its pitch. 64 bands (~45 Hz apart) keep it, and the
    basis fits their 256 features per token into the 128 of the LTX latent width.
    """

    frames_per_token = 4

    def __init__(self, n_mels=32, n_fft=512, griffin_lim_iters=32, mean=-6.0, std=2.5,
                 sample_rate=SAMPLE_RATE, hop_length=160, basis=None):
        super().__init__()
        self.n_mels, self.n_fft, self.hop_length = n_mels, n_fft, hop_length
        self.griffin_lim_iters, self.mean, self.std = griffin_lim_iters, mean, std
        self.sample_rate = self.output_rate = sample_rate
        self.channels = 1
        self.frame_dim = self.frames_per_token * n_mels  # features per token before any projection
        self.basis_path = basis if isinstance(basis, str) else ""
        if isinstance(basis, str):
            basis = load_mel_basis(basis, self) if basis else None
        basis = None if basis is None else check_mel_basis(basis, self.frame_dim, self.basis_path or "basis")
        for k in ("mean", "components", "scale"):  # buffers: they follow the codec's .to() (not in its state_dict)
            self.register_buffer(f"basis_{k}", None if basis is None else basis[k], persistent=False)
        self.latent_dim = self.frame_dim if basis is None else len(basis["components"])
        self.tokens_per_second = sample_rate // (hop_length * self.frames_per_token)  # 25
        self.grad_checkpointing = False  # nothing to checkpoint; kept for the common interface
        fb = slaney_mel_fb(n_fft, n_mels, sample_rate)  # (n_freqs, n_mels)
        self.register_buffer("mel_fb", fb, persistent=False)
        self.register_buffer("mel_fb_pinv", torch.linalg.pinv(fb.T), persistent=False)  # (n_freqs, n_mels)

    @property
    def basis(self):
        """{"mean", "components", "scale"} on the codec's device, or None without a basis."""
        if self.basis_components is None:
            return None
        return {"mean": self.basis_mean, "components": self.basis_components, "scale": self.basis_scale}

    def num_tokens(self, num_samples):
        """N // hop + 1 frames (centred STFT), 4 to a token, the last one padded: N // 640 + 1."""
        return -(-(num_samples // self.hop_length + 1) // self.frames_per_token)

    def encode(self, wav):
        """(B, C, N) at 16 kHz -> (B, T, latent_dim) fp32; without a basis, feature k * n_mels + m is
        frame k, bin m."""
        wav = to_channels(wav.float(), 1)
        x = log_mel(wav, self.sample_rate, self.n_fft, self.hop_length, self.mel_fb)[:, 0]  # (B, F, M)
        x = (x - self.mean) / self.std
        floor = (math.log(1e-5) - self.mean) / self.std  # pad the last token with silence
        x = F.pad(x, (0, 0, 0, -x.shape[1] % self.frames_per_token), value=floor)
        x = x.flatten(1).unflatten(1, (-1, self.frame_dim))  # (B, T, 4*M)
        if self.basis is not None:
            b = self.basis
            x = (x - b["mean"]) @ b["components"].T / b["scale"]  # (B, T, D)
        return x

    def decode(self, latents):
        """(B, T, latent_dim) -> (B, 1, (4T - 1) * hop) waveform at 16 kHz (differentiable)."""
        x = latents.float()
        if self.basis is not None:
            b = self.basis
            x = (x * b["scale"]) @ b["components"] + b["mean"]  # (B, T, 4*M)
        x = x.unflatten(2, (self.frames_per_token, self.n_mels)).flatten(1, 2)  # (B, F, M)
        mel = torch.exp(x * self.std + self.mean).transpose(1, 2)  # (B, M, F)
        mag = torch.relu(self.mel_fb_pinv @ mel)  # (B, n_freqs, F)
        window = torch.hann_window(self.n_fft, device=mag.device)
        wav = AF.griffinlim(mag, window, self.n_fft, self.hop_length, self.n_fft, power=1.0,
                            n_iter=self.griffin_lim_iters, momentum=0.99, length=None, rand_init=False)
        return wav[:, None]

    def decode_16k(self, latents):
        """`decode` at 16 kHz (the ReFL scorers' rate)."""
        return resample(self.decode(latents), self.output_rate, SAMPLE_RATE)

    def settings(self):
        """What determines `encode`'s output (for `codec_fingerprint`)."""
        return {"codec": "mel", "n_mels": self.n_mels, "n_fft": self.n_fft, "hop_length": self.hop_length,
                "sample_rate": self.sample_rate, "mean": self.mean, "std": self.std,
                "frames_per_token": self.frames_per_token}

    def encode_state(self):
        """The basis's tensors (they change every latent), none without one."""
        return {} if self.basis is None else dict(self.basis)


MEL_BASIS_FORMAT = "speakerbox.mel_basis.v1"


def fit_mel_basis(codec, wavs, dim, whiten=0.0):
    """The `dim` leading principal components of the tokens of `wavs` [(N,) or (C, N) at the codec's
    rate] under `codec` (a MelCodec without a basis): {"mean", "components", "scale"}. Each
    component's sign makes its largest loading positive (a deterministic fit). A clip's last token,
    padded with silence, is left out.

    `scale` makes the projected tokens' overall standard deviation 1. whiten 0: one number (each
    component keeps its own spread: the leading ones, the spectral envelope, hold most of the
    variance and the trailing ones, the fine detail, little). whiten w > 0: one number per component,
    proportional to its standard deviation ** w, so that component k's spread becomes std_k ** (1 - w)
    (1: every component at spread 1). Flow matching lays a component down at the noise level that
    buries it, so the detail a low component holds (a low voice's harmonics) is otherwise drawn only
    at the last steps."""
    if not 0.0 <= whiten <= 1.0:
        raise ValueError(f"whiten must be in [0, 1], got {whiten}")
    if codec.basis is not None:
        raise ValueError("fit_mel_basis needs the codec without a basis")
    if not 0 < dim <= codec.frame_dim:
        raise ValueError(f"basis dim must be in 1..{codec.frame_dim} (4 x {codec.n_mels} mels), got {dim}")
    with torch.no_grad():
        tokens = torch.cat([codec.encode(torch.as_tensor(w, dtype=torch.float32).reshape(1, -1, w.shape[-1]))[0, :-1]
                            for w in wavs]).double()
    if len(tokens) < dim:
        raise ValueError(f"{len(tokens)} tokens cannot fit a {dim}-dim basis: give more audio")
    mean = tokens.mean(0)
    _, _, vh = torch.linalg.svd(tokens - mean, full_matrices=False)
    comps = vh[:dim]
    comps = comps * torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    projected = (tokens - mean) @ comps.T
    scale = projected.std(0) ** whiten if whiten else torch.ones(1, dtype=projected.dtype)
    scale = scale * (projected / scale).std()
    return {"mean": mean.float(), "components": comps.float().contiguous(), "scale": scale.float()}


def save_mel_basis(path, basis, codec, source=""):
    """Write a basis (atomically, safetensors) with the codec settings it was fitted under."""
    save_safetensors(basis, path, metadata={"format": MEL_BASIS_FORMAT, "codec": codec.settings(), "source": source})


def check_mel_basis(basis, frame_dim, where):
    """The basis tensors in fp32, or a clear error naming `where`."""
    need = {"mean", "components", "scale"}
    if set(basis) != need:
        raise ValueError(f"{where}: a mel basis holds {sorted(need)}, got {sorted(basis)}")
    mean, comps, scale = (basis[k].float() for k in ("mean", "components", "scale"))
    if comps.ndim != 2 or comps.shape[1] != frame_dim or mean.shape != (frame_dim,) \
            or scale.shape not in ((1,), (len(comps),)):
        raise ValueError(f"{where}: basis shapes mean {tuple(mean.shape)}, components {tuple(comps.shape)}, scale "
                         f"{tuple(scale.shape)} do not fit tokens of {frame_dim} features")
    if not bool((scale > 0).all()):
        raise ValueError(f"{where}: basis scale must be > 0, got {scale.min().item()}")
    return {"mean": mean, "components": comps, "scale": scale}


def load_mel_basis(path, codec):
    """A basis file for `codec` (a MelCodec's settings); refuses one fitted under other settings."""
    meta = read_safetensors_metadata(path)
    if meta.get("format") != MEL_BASIS_FORMAT:
        raise ValueError(f"{path}: not a mel basis file (format {meta.get('format')!r}; write one with "
                         "`python data.py fit_codec`)")
    fitted = json.loads(meta.get("codec", "{}"))
    if fitted != codec.settings():
        diff = sorted(k for k in set(fitted) | set(codec.settings()) if fitted.get(k) != codec.settings().get(k))
        raise ValueError(f"{path}: fitted for other codec settings ({', '.join(f'{k} {fitted.get(k)}' for k in diff)}; "
                         f"this codec: {', '.join(f'{k} {codec.settings().get(k)}' for k in diff)})")
    return load_safetensors(path)


# ------------------------------------------------------------------------------------------------
# Loading and identity


# The keys ltx-core 1.0.0 reads for the audio encoder, decoder and vocoder (its SD ops filters).
LTX_CODEC_PREFIXES = ("audio_vae.encoder.", "audio_vae.decoder.", "audio_vae.per_channel_statistics.", "vocoder.")


def build_codec(name, ckpt="", **kwargs):
    """Build a codec: "mel" (kwargs go to MelCodec) or "ltx" (from the `audio_vae.*` and
    `vocoder.*` tensors and metadata of the full LTX-2 checkpoint `ckpt`, in fp32)."""
    if name == "mel":
        return MelCodec(**kwargs)
    if name != "ltx":
        raise ValueError(f"unknown codec {name!r} (expected 'mel' or 'ltx')")
    if kwargs:
        raise TypeError(f"the ltx codec takes no options, got {sorted(kwargs)}")
    if not ckpt:
        raise ValueError("the ltx codec needs `ckpt`: the LTX-2 checkpoint holding audio_vae.* and vocoder.*")
    config = read_checkpoint_config(ckpt)
    for section in ("audio_vae", "vocoder"):
        if section not in config:
            raise ValueError(f"{ckpt}: metadata config has no '{section}' section")
    with torch.device("meta"):  # no random init of weights that are overwritten next
        codec = LTXAudioCodec(config)
    state = load_prefixed_state(ckpt, "", keep=lambda k: k.startswith(LTX_CODEC_PREFIXES), dtype=torch.float32)
    want = codec.state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    if missing or unexpected:
        raise ValueError(f"{ckpt}: audio codec keys do not match the metadata config: "
                         f"{len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected {unexpected[:5]}")
    bad = [k for k in want if want[k].shape != state[k].shape]
    if bad:
        raise ValueError(f"{ckpt}: shape mismatch for {bad[:5]}: file {[tuple(state[k].shape) for k in bad[:5]]}, "
                         f"config {[tuple(want[k].shape) for k in bad[:5]]}")
    codec.load_state_dict(state, strict=True, assign=True)
    assert not any(t.is_meta for t in [*codec.parameters(), *codec.buffers()]), "a tensor was left unloaded"
    return codec.eval()


def codec_kwargs(cfg):
    """The build_codec options a run Config sets for its codec (the `mel_*` fields for "mel")."""
    if cfg.codec == "mel":
        return dict(n_mels=cfg.mel_n_mels, n_fft=cfg.mel_n_fft, griffin_lim_iters=cfg.griffin_lim_iters,
                    mean=cfg.mel_mean, std=cfg.mel_std, basis=cfg.mel_basis)
    return {}


def codec_from_config(cfg, fitting=False):
    """build_codec from a run Config (`codec`, `codec_ckpt` and the `mel_*` fields). `fitting`: the
    mel codec without its basis, to fit one (data.py fit_codec)."""
    if cfg.codec != "mel" or not cfg.mel_basis_dim:
        if cfg.codec == "mel" and cfg.mel_basis:
            raise ValueError(f"mel_basis {cfg.mel_basis} is set but mel_basis_dim is 0: set mel_basis_dim to the "
                             "basis's dim (or drop mel_basis)")
        return build_codec(cfg.codec, cfg.codec_ckpt, **codec_kwargs(cfg))
    if fitting:
        return build_codec("mel", **{**codec_kwargs(cfg), "basis": None})
    if not cfg.mel_basis:
        raise ValueError(f"mel_basis_dim {cfg.mel_basis_dim} needs mel_basis, the fitted basis file: fit it with "
                         "`python data.py fit_codec CONFIG --manifest=TRAIN.jsonl --mel_basis=OUT.safetensors`")
    codec = build_codec("mel", **codec_kwargs(cfg))
    if codec.latent_dim != cfg.mel_basis_dim:
        raise ValueError(f"{cfg.mel_basis}: a basis of {codec.latent_dim} components, the config's mel_basis_dim "
                         f"is {cfg.mel_basis_dim}")
    return codec


def codec_fingerprint(codec):
    """A short hash of everything `encode` depends on (settings, and for LTX the encoder weights
    and latent statistics), so a latent cache is rebuilt exactly when its latents would change.
    Decoder and vocoder weights do not enter it: they never change a cached latent."""
    h = hashlib.sha256(json.dumps(codec.settings(), sort_keys=True).encode())
    for name, t in sorted(codec.encode_state().items()):
        h.update(f"{name}:{tuple(t.shape)}".encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# python -m codec in.wav out.wav


def main(argv=None):
    """Round-trip a file through a codec and write what the model will learn from."""
    from config import Config  # the run config's defaults, so the CLI cannot drift from them

    cfg = Config()
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--codec", default=cfg.codec, choices=["mel", "ltx"])
    p.add_argument("--ckpt", default=cfg.codec_ckpt, help="LTX-2 checkpoint (codec ltx)")
    keys = ("mel_n_mels", "mel_n_fft", "mel_mean", "mel_std", "mel_basis_dim", "mel_basis", "griffin_lim_iters")
    for key in keys:
        p.add_argument(f"--{key}", type=type(getattr(cfg, key)), default=getattr(cfg, key))
    args = p.parse_args(argv)
    codec = codec_from_config(dataclasses.replace(cfg, codec=args.codec, codec_ckpt=args.ckpt,
                                                  **{k: getattr(args, k) for k in keys}))
    wav = load_audio(args.input, codec.sample_rate, codec.channels)  # (C, N)
    with torch.no_grad():
        latents = codec.encode(wav[None])  # (1, T, latent_dim)
        out = codec.decode(latents)[0]  # (C_out, N_out)
    sf.write(args.output, out.clamp(-1, 1).T.numpy(), codec.output_rate)
    print(f"{args.input}: {wav.shape[1] / codec.sample_rate:.2f} s -> {latents.shape[1]} tokens x "
          f"{latents.shape[2]} ({args.codec}, fingerprint {codec_fingerprint(codec)}) -> "
          f"{args.output} ({out.shape[0]} ch, {codec.output_rate} Hz)")


if __name__ == "__main__":
    main()
