"""Sample speech from the LTX-2 audio DiT, optionally in the voice of a reference speaker.

    python sample.py --ckpt merged_dit.safetensors --full_ckpt ltx-2.3-22b-dev.safetensors \
        --adaln adaln.safetensors --ref speaker.wav \
        --prompt "Warm, conversational tone. 'Hello, welcome to the show.'" --out out.wav

The maths follows ltx-core and DramaBox: the LTX2 σ schedule, guidance on x0 (CFG against a negative prompt, STG,
speaker guidance, std rescale) with every pass of a step in ONE batched forward, Euler in fp32,
the DramaBox duration estimate, and the two ways to give the model a speaker: SpeakerAdaLNZero
deltas (LAIONBox) and DramaBox IC-LoRA reference tokens. `sample()` is importable (eval.py and
training-time validation use it); the rest of this file is the command line.
"""

import argparse
import json
import math
import os
import re
import sys
import time

import torch

import audio
import files
import losses
from data import REF_PEAK  # the -4 dBFS peak references get, in training features and here

# -----------------------------------------------------------------------------------------------
# σ schedule (ltx-core LTX2Scheduler)

DEFAULT_SHIFT_TOKENS = 4096  # the reference pipelines pass no latent, so the shift is 2.05
# DramaBox passes its patchified (B, T, 128) latent; the scheduler counts prod(shape[2:]) = 128
# tokens whatever the length (it was written for video latents), so its shift is always ~0.63.
DRAMABOX_SHIFT_TOKENS = 128


def ltx2_sigmas(steps, n_tokens=None, *, shift=None, stretch_to=0.1):
    """The LTX2Scheduler σ schedule: steps+1 values from 1 down to 0, fp32.

    σ = e^s / (e^s + 1/t - 1) on t = linspace(1, 0, steps+1) with s = `shift`, or the shift of
    `n_tokens` (default 4096 tokens as the reference pipelines; DramaBox's is DRAMABOX_SHIFT_TOKENS).
    Then the non-zero σ are stretched so that the last one is `stretch_to` (None: no stretch):
    1 - σ is divided by (1 - σ_last) / (1 - stretch_to).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    s = shift if shift is not None else losses.shift_for_tokens(n_tokens or DEFAULT_SHIFT_TOKENS)
    t = torch.linspace(1.0, 0.0, steps + 1)
    e = math.exp(s)
    sigmas = torch.where(t != 0, e / (e + (1 / t - 1)), 0.0)
    nonzero = sigmas != 0
    one_minus = 1.0 - sigmas[nonzero]
    if stretch_to is not None and one_minus[-1] != 0:  # (a 1-step schedule [1, 0] has nothing to stretch)
        sigmas[nonzero] = 1.0 - one_minus / (one_minus[-1] / (1.0 - stretch_to))
    return sigmas.to(torch.float32)


# -----------------------------------------------------------------------------------------------
# guidance on x0


def guided_x0(c, u=None, p=None, m=None, *, cfg=1.0, stg=0.0, spk_cfg=1.0, rescale=0.0):
    """Combine the x0 predictions of one step (ltx-core's MultiModalGuider).

    c: conditioned; u: negative/empty prompt; p: STG-perturbed; m: no speaker. All (B, T, F).
    pred = c + (cfg-1)(c-u) + stg(c-p) + (spk_cfg-1)(c-m); a term whose tensor is None is left out.
    rescale r: pred *= r * std(c)/std(pred) + (1-r), the std taken per sample (the reference takes
    it over its whole tensor, which is one sample in its pipelines) so that a sample does not
    depend on the others in its batch.
    """
    pred = c
    if u is not None:
        pred = pred + (cfg - 1) * (c - u)
    if p is not None:
        pred = pred + stg * (c - p)
    if m is not None:
        pred = pred + (spk_cfg - 1) * (c - m)
    if rescale != 0:
        dims = tuple(range(1, c.ndim))
        factor = c.std(dim=dims, keepdim=True) / pred.std(dim=dims, keepdim=True)
        pred = pred * (rescale * factor + (1 - rescale))
    return pred


# -----------------------------------------------------------------------------------------------
# DramaBox duration estimate

TOKENS_PER_SECOND = 25  # audio latents per second (the VAE: hop 160 at 16 kHz, x4 in time)
CHARS_PER_SECOND = 14.0
# Seconds budgeted per non-verbal cue found anywhere in the prompt (a subset of DramaBox's table).
CUE_SECONDS = {
    r"\bsighs?\b": 0.8,
    r"\bgasps?\b": 0.5,
    r"\bpauses?\b": 0.5,
    r"\blaugh(?:s|ed|ing)?\b": 1.5,
}
_DOUBLE_QUOTED = re.compile(r'"([^"]+)"|\u201c([^\u201d]+)\u201d')
# A single-quoted span; an apostrophe followed by a letter (don't, it's) stays inside the span.
_SINGLE_QUOTED = re.compile(r"'((?:[^']|'(?![\s.,!?)\]]))+)'")


def spoken_text(prompt):
    """The words to be spoken: double-quoted spans, else single-quoted spans of more than 3 words
    (shorter ones are stage directions), else the text after the first colon, else the prompt."""
    spans = [a or b for a, b in _DOUBLE_QUOTED.findall(prompt)]
    if not spans:
        spans = [s for s in _SINGLE_QUOTED.findall(prompt) if len(s.split()) > 3]
    if spans:
        return " ".join(spans)
    if ":" in prompt:
        return prompt.split(":", 1)[1].strip()
    return prompt


def estimate_duration(prompt, multiplier=1.1):
    """Seconds of audio to generate for `prompt` (DramaBox's estimator).

    14 chars/s of spoken text (x0.6 under 40 chars, x0.8 under 80: short lines are spoken slower),
    +0.3 s per sentence end, + the cue budgets, +2 s, at least 3 s; then the server's
    `max(3, base * multiplier + 0.8)` safety pad, rounded to 0.1 s.
    """
    text = spoken_text(prompt)
    n = len(text)
    rate = CHARS_PER_SECOND * (0.6 if n < 40 else 0.8 if n < 80 else 1.0)
    seconds = n / rate + 0.3 * sum(text.count(c) for c in ".!?")
    seconds += sum(budget * len(re.findall(pat, prompt, re.IGNORECASE)) for pat, budget in CUE_SECONDS.items())
    base = max(3.0, round(seconds + 2.0, 1))
    return max(3.0, round(base * multiplier + 0.8, 1))


def n_latent_tokens(seconds):
    """Audio latents for `seconds` of audio: round(25 d)."""
    return max(1, round(TOKENS_PER_SECOND * seconds))


# -----------------------------------------------------------------------------------------------
# speaker references

REF_SECONDS = 10.0  # DramaBox encodes ~10 s of the reference
MIN_REF_SECONDS = 1.0  # LAIONBox recommends 3-15 s; under 1 s there is no voice to copy
SILENCE_RMS = 1e-4


def prepare_reference(wav, sample_rate, name="reference"):
    """Check and normalise a reference waveform (C, N): crop to REF_SECONDS, peak to -4 dBFS.

    Raises ValueError naming `name` when it is too short or silent.
    """
    wav = torch.as_tensor(wav, dtype=torch.float32)
    if wav.ndim == 1:
        wav = wav[None]
    seconds = wav.shape[-1] / sample_rate
    if seconds < MIN_REF_SECONDS:
        raise ValueError(f"{name}: reference audio is {seconds:.2f} s long, at least {MIN_REF_SECONDS} s "
                         f"is needed (3-15 s recommended)")
    if not torch.isfinite(wav).all():
        raise ValueError(f"{name}: reference audio contains NaN or Inf samples")
    wav = wav[..., : int(REF_SECONDS * sample_rate)]
    rms = wav.pow(2).mean().sqrt().item()
    if rms < SILENCE_RMS:
        raise ValueError(f"{name}: reference audio is silent (RMS {rms:.2e})")
    return wav * (REF_PEAK / wav.abs().max())


def load_reference(path, sample_rate, channels):
    """Read a reference file with codec.load_audio, with errors that name the file."""
    from codec import load_audio

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--ref {path}: file not found")
    try:
        wav = load_audio(path, sample_rate, channels)
    except ValueError:  # codec.load_audio names the file and the problem
        raise
    except Exception as e:  # soundfile / resampling errors of other types
        raise ValueError(f"--ref {path}: cannot read audio ({type(e).__name__}: {e})") from e
    return prepare_reference(wav, sample_rate, name=path)


def check_reference(path):
    """Read a reference at its own rate and run prepare_reference's checks (before any model loads)."""
    import soundfile as sf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--ref {path}: file not found")
    try:
        wav, rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises RuntimeError / LibsndfileError for broken files
        raise ValueError(f"--ref {path}: cannot read audio ({type(e).__name__}: {e})") from e
    prepare_reference(torch.from_numpy(wav.T), rate, name=path)


def reference_mask(n_target, n_ref, see_ref=True):
    """Self-attention mask (n, n), bool (True = attend), n = n_target + n_ref, for target tokens
    followed by reference tokens.

    Target attends to target and (if `see_ref`) to the reference; the reference attends only to
    itself (read-only conditioning: DramaBox's asymmetric IC-LoRA mask). The model turns it into
    an additive log bias (0 / finfo.min), as the reference does with its [0, 1] mask.
    """
    n = n_target + n_ref
    allowed = torch.zeros(n, n, dtype=torch.bool)
    allowed[:n_target, :n_target] = True
    allowed[n_target:, n_target:] = True
    allowed[:n_target, n_target:] = see_ref
    return allowed


# -----------------------------------------------------------------------------------------------
# the sampler

REF_MODES = ("adaln", "tokens", "both", "none")


def _guidance_passes(cfg, stg, spk_cfg, has_speaker):
    """The passes one step needs besides the conditioned one, in batch order."""
    passes = ["cond"]
    if cfg != 1.0:
        passes.append("uncond")
    if stg != 0.0:
        passes.append("stg")
    if spk_cfg != 1.0 and has_speaker:
        passes.append("nospk")
    return passes


@torch.no_grad()
def denoise(model, noise, context, neg_context, *, sigmas, ref_latent=None, deltas=None,
            cfg=1.0, stg=0.0, stg_blocks=(), spk_cfg=1.0, rescale=0.0, dtype=torch.float32,
            progress=None):
    """Run the Euler sampler from `noise` (B, T, F) to x0 (B, T, F), fp32.

    context / neg_context: (B, L, D) connector outputs of the prompts and the negative prompt.
    ref_latent: (B, Tr, F) clean reference tokens appended after the target (σ = 0, +0.5 s
    positions, asymmetric mask) or None. deltas: (B, blocks, rows*D) SpeakerAdaLNZero deltas or None.
    Every pass (cond, uncond, STG, no-speaker) goes into one forward of batch P*B per step.
    """
    from model import audio_positions

    B, T, _ = noise.shape
    device = noise.device
    Tr = 0 if ref_latent is None else ref_latent.shape[1]
    passes = _guidance_passes(cfg, stg, spk_cfg, ref_latent is not None or deltas is not None)
    P = len(passes)
    rep = lambda t: torch.cat([t] * P) if t is not None else None  # noqa: E731

    # Per-pass inputs that do not change over the steps, stacked pass-major: (P*B, ...).
    ctx = torch.cat([neg_context if p == "uncond" else context for p in passes]).to(dtype)
    stg_mask = torch.tensor([p == "stg" for p in passes], device=device).repeat_interleave(B)
    block_deltas = None
    if deltas is not None:
        block_deltas = torch.cat([torch.zeros_like(deltas) if p == "nospk" else deltas for p in passes])
    positions = audio_positions(T, B).to(device)  # (B, T) seconds
    attn_mask = None
    if Tr:
        positions = torch.cat([positions, audio_positions(Tr, B, offset_s=0.5).to(device)], dim=1)
        masks = [reference_mask(T, Tr, see_ref=p != "nospk") for p in passes]
        attn_mask = torch.stack(masks).repeat_interleave(B, 0).to(device)  # (P*B, n, n)
    positions = rep(positions)
    ref = rep(ref_latent.float()) if Tr else None

    x = noise.float()
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        x_in = rep(x)
        sig = torch.full((P * B,), sigma, device=device)
        timesteps = None
        if Tr:  # per-token σ: the reference tokens are clean
            x_in = torch.cat([x_in, ref], dim=1)
            timesteps = torch.cat([sig[:, None].expand(-1, T), torch.zeros(P * B, Tr, device=device)], dim=1)
        # σ stays fp32: the timestep embedding is computed in fp32 (as the reference) whatever the dtype
        v = model(x_in.to(dtype), sig, ctx, timesteps=timesteps, positions=positions,
                  attn_mask=attn_mask, stg_blocks=tuple(stg_blocks) if "stg" in passes else (),
                  stg_samples=stg_mask if "stg" in passes else None, block_deltas=block_deltas)
        x0 = (x_in[:, :T] - sigma * v[:, :T].float()).view(P, B, T, -1)  # x0 = x_t - σ v, fp32
        parts = dict(zip(passes, x0.unbind(0)))
        pred = guided_x0(parts["cond"], parts.get("uncond"), parts.get("stg"), parts.get("nospk"),
                         cfg=cfg, stg=stg, spk_cfg=spk_cfg, rescale=rescale)
        # Euler on the velocity implied by the guided x0, as the reference's stepper.
        x = x + (x - pred) / sigma * (sigma_next - sigma)
        if progress is not None:
            progress.update(1)
    return x


def _as_list(value, n, name):
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}: {len(value)} values for {n} prompts")
        return list(value)
    return [value] * n


@torch.no_grad()
def sample(model, codec, text_encoder, connector, prompts, *, seeds, ref_wavs=None, ref_mode="adaln",
           adaln=None, speaker=None, steps=30, cfg=7.0, stg=1.0, stg_blocks=None, spk_cfg=1.0,
           rescale=0.7, duration="auto", device="cpu", dtype=torch.float32, batch_size=4,
           negative_prompt="", shift_tokens=None, progress=True):
    """Generate one waveform per (prompt, seed[, reference]) item; returns a list of (C, N) tensors
    at `codec.output_rate`, in the order of `prompts`.

    prompts, seeds: equal-length lists (one item each). ref_wavs: None, or per item None / a path /
    a (C, N) tensor at codec.sample_rate. ref_mode: adaln (SpeakerAdaLNZero deltas from `speaker`
    features through `adaln`), tokens (DramaBox reference tokens), both, none. duration: "auto"
    (DramaBox estimate), seconds, or a per-item list. Items of equal length share a batch of up to
    `batch_size`; each item's noise comes from its own generator seeded with its seed, so an item's
    audio does not depend on what else is in its batch. stg_blocks: None = the model's STG block.
    shift_tokens: token count of the σ-schedule shift (None: 4096, the reference pipelines').
    """
    if ref_mode not in REF_MODES:
        raise ValueError(f"ref_mode must be one of {REF_MODES}, got {ref_mode!r}")
    n = len(prompts)
    seeds = _as_list(seeds, n, "seeds")
    refs = _as_list(ref_wavs, n, "ref_wavs")
    durations = _as_list(duration, n, "duration")
    use_tokens = ref_mode in ("tokens", "both")
    use_adaln = ref_mode in ("adaln", "both")
    if use_adaln and any(r is not None for r in refs) and (adaln is None or speaker is None):
        raise ValueError(f"ref_mode={ref_mode!r} needs a SpeakerAdaLNZero (--adaln) and speaker extractors")
    dtype = files.DTYPES[dtype] if isinstance(dtype, str) else dtype
    stg_blocks = (model.cfg.stg_block,) if stg_blocks is None else tuple(stg_blocks)
    channels = getattr(codec, "channels", 2)

    # Reference latents / speaker deltas per item, computed once.
    ref_lat, ref_deltas = [None] * n, [None] * n
    cache = {}
    for i, r in enumerate(refs):
        if r is None or ref_mode == "none":
            continue
        key = r if isinstance(r, str) else id(r)
        if key not in cache:
            wav = load_reference(r, codec.sample_rate, channels) if isinstance(r, str) else \
                prepare_reference(r, codec.sample_rate, name=f"reference of item {i}")
            lat = codec.encode(wav[None].to(device)).float() if use_tokens else None  # (1, Tr, F)
            d = None
            if use_adaln:
                mono = wav.mean(0, keepdim=True)  # (1, N)
                wav16 = audio.resample(mono, codec.sample_rate, audio.SAMPLE_RATE).to(device)
                d = adaln(speaker(wav16).float())  # (1, blocks, rows*D)
            cache[key] = (lat, d)
        ref_lat[i], ref_deltas[i] = cache[key]

    # Group items of equal shape (target and reference length) into batches, keeping order.
    T = [n_latent_tokens(estimate_duration(p) if d == "auto" else float(d)) for p, d in zip(prompts, durations)]
    groups = {}
    for i in range(n):
        key = (T[i], None if ref_lat[i] is None else ref_lat[i].shape[1], ref_deltas[i] is not None)
        groups.setdefault(key, []).append(i)
    batches = [idx[j:j + batch_size] for idx in groups.values() for j in range(0, len(idx), batch_size)]

    F_lat = model.cfg.in_channels  # latent features per token
    total_steps = steps * len(batches)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, desc="sampling", unit="step", disable=not sys.stderr.isatty())
    out = [None] * n
    for idx in batches:
        t = T[idx[0]]
        noise = torch.stack([torch.randn(t, F_lat, generator=torch.Generator().manual_seed(int(seeds[i])))
                             for i in idx]).to(device)  # (B, T, F), drawn on CPU: the same on any device
        texts = [prompts[i] for i in idx] + [negative_prompt]
        feats, mask = text_encoder.encode(texts)
        ctx_all = connector(feats, mask).float()  # (B+1, L, D)
        context, neg_context = ctx_all[:-1], ctx_all[-1:].expand(len(idx), -1, -1)
        ref = torch.cat([ref_lat[i] for i in idx]) if ref_lat[idx[0]] is not None else None
        deltas = torch.cat([ref_deltas[i] for i in idx]) if ref_deltas[idx[0]] is not None else None
        sigmas = ltx2_sigmas(steps, shift_tokens)
        x0 = denoise(model, noise, context, neg_context, sigmas=sigmas, ref_latent=ref, deltas=deltas,
                     cfg=cfg, stg=stg, stg_blocks=stg_blocks, spk_cfg=spk_cfg, rescale=rescale,
                     dtype=dtype, progress=bar)
        wav = codec.decode(x0).float().cpu()  # (B, C, N)
        check_generated(x0, wav)
        for j, i in enumerate(idx):
            out[i] = wav[j]
    if bar is not None:
        bar.close()
    return out


def check_generated(x0, wav):
    """Refuse generations that are not audio, before anything is written: NaN / Inf latents or
    samples, or a constant waveform (what a codec makes of garbage latents: a full-scale DC).
    Both mean diverged or damaged weights."""
    if not torch.isfinite(x0).all() or not torch.isfinite(wav).all():
        raise ValueError("the sampled latents or audio hold NaN / Inf: the model's weights are diverged or damaged; "
                         "nothing written")
    flat = wav.flatten(1)  # (B, C*N)
    spread = (flat.max(1).values - flat.min(1).values).min().item()
    if spread < 1e-6:
        raise ValueError(f"the generated audio is a constant {flat[0, 0].item():.3f} (DC, no sound): the model's "
                         "weights are diverged or damaged; nothing written")


# -----------------------------------------------------------------------------------------------
# the joint audio-video model: both streams denoised together, video left as latents

VIDEO_SCALE = (8, 32, 32)  # pixels per video latent (time, height, width); 1 + 8k frames


def video_latent_shape(frames, height, width):
    """(F, H, W) latents of a clip of `frames` (1 + 8k) pixel frames of height x width (multiples of 32)."""
    st, sh, sw = VIDEO_SCALE
    if (frames - 1) % st or height % sh or width % sw or min(frames, height, width) <= 0:
        raise ValueError(f"video of {frames} frames at {width}x{height}: frames must be 1 + 8k and the size "
                         "multiples of 32 (the video VAE's factors)")
    return (frames - 1) // st + 1, height // sh, width // sw


@torch.no_grad()
def denoise_av(model, video_noise, audio_noise, context, neg_context, *, video_positions, sigmas, cfg=(1.0, 1.0),
               rescale=0.0, dtype=torch.float32, progress=None):
    """Euler from noise to (video x0 (B, Tv, Cv), audio x0 (B, Ta, C)), both streams on one σ
    schedule (as the reference AV pipelines), fp32. context / neg_context: (video, audio) connector
    outputs. cfg: (video, audio) scales (the LTX-2.3 pipelines guide video at 3 and audio at 7); when
    either is not 1 the negative-prompt pass joins the same forward (batch 2B); guidance and
    rescale per stream as `guided_x0`."""
    B = video_noise.shape[0]
    passes = ["cond"] + (["uncond"] if tuple(cfg) != (1.0, 1.0) else [])
    P = len(passes)
    ctx_video = torch.cat([neg_context[0] if p == "uncond" else context[0] for p in passes]).to(dtype)
    ctx_audio = torch.cat([neg_context[1] if p == "uncond" else context[1] for p in passes]).to(dtype)
    positions = torch.cat([video_positions] * P)
    xv, xa = video_noise.float(), audio_noise.float()
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        sig = torch.full((P * B,), sigma, device=xv.device)
        xv_in, xa_in = torch.cat([xv] * P), torch.cat([xa] * P)
        vv, va = model.forward_av(xv_in.to(dtype), xa_in.to(dtype), sig, sig, ctx_video, ctx_audio,
                                  video_positions=positions)
        out = []
        for x, x_in, v, scale in ((xv, xv_in, vv, cfg[0]), (xa, xa_in, va, cfg[1])):
            x0 = (x_in - sigma * v.float()).view(P, B, *x.shape[1:])
            pred = guided_x0(x0[0], x0[1] if P > 1 else None, cfg=scale, rescale=rescale)
            out.append(x + (x - pred) / sigma * (sigma_next - sigma))
        xv, xa = out
        if progress is not None:
            progress.update(1)
    return xv, xa


@torch.no_grad()
def sample_av(model, codec, text_encoder, connectors, prompts, *, seeds, frames=97, height=192, width=192, fps=24.0,
              steps=30, cfg=(3.0, 7.0), rescale=0.0, device="cpu", dtype=torch.float32, negative_prompt="",
              shift_tokens=None):
    """Joint audio-video samples, one per (prompt, seed) item: a list of (waveform (C, N) at
    codec.output_rate, video latents (C, F, H, W)). connectors: (video, audio) text connectors;
    cfg: (video, audio) guidance scales.
    The audio lasts as long as the video, round(25 · frames / fps) latents (the reference's rule).
    Each item's noise (audio, then video) comes from its own seed; items run one prompt at a time."""
    F, H, W = video_latent_shape(frames, height, width)
    Ta = n_latent_tokens(frames / fps)
    Cv, Ca = model.cfg.video_in_channels, model.cfg.in_channels
    from model import video_positions

    out = []
    for prompt in dict.fromkeys(prompts):
        idx = [i for i, p in enumerate(prompts) if p == prompt]
        gens = [torch.Generator().manual_seed(int(seeds[i])) for i in idx]
        audio_noise = torch.stack([torch.randn(Ta, Ca, generator=g) for g in gens]).to(device)
        video_noise = torch.stack([torch.randn(F * H * W, Cv, generator=g) for g in gens]).to(device)
        audio_feats, video_feats, mask = text_encoder.encode_av([prompt, negative_prompt])
        ctx_video = connectors[0](video_feats.to(device), mask.to(device)).float()
        ctx_audio = connectors[1](audio_feats.to(device), mask.to(device)).float()
        rep = lambda t: t.expand(len(idx), -1, -1)  # noqa: E731
        xv, xa = denoise_av(model, video_noise, audio_noise, (rep(ctx_video[:1]), rep(ctx_audio[:1])),
                            (rep(ctx_video[1:]), rep(ctx_audio[1:])),
                            video_positions=video_positions(F, H, W, len(idx), fps=fps, device=device),
                            sigmas=ltx2_sigmas(steps, shift_tokens), cfg=cfg, rescale=rescale, dtype=dtype)
        wavs = codec.decode(xa).float().cpu()
        latents = xv.view(len(idx), F, H, W, Cv).permute(0, 4, 1, 2, 3).cpu()  # tokens (f, h, w) -> [C, F, H, W]
        out += [(i, (wavs[j], latents[j])) for j, i in enumerate(idx)]
    return [item for _, item in sorted(out, key=lambda t: t[0])]


def video_decode_hint():
    """How to turn the written video latents into pixels: ltx-core's video VAE, when installed."""
    import importlib.util

    if importlib.util.find_spec("ltx_core") is None:
        return ("video latents written; decoding them to pixels needs ltx-core (pip install ltx-core) and the "
                "checkpoint's video VAE: this repository only generates them")
    return ("video latents written; ltx-core is installed: decode with ltx_core.model.video_vae.decode_video("
            "torch.load(path)['latents'][None], decoder), the decoder built by VideoDecoderConfigurator from the "
            "same checkpoint's vae.* weights and config")


# -----------------------------------------------------------------------------------------------
# command line

PRESETS_HELP = """guidance presets (each project's published defaults):
  LTX-2.3 (default)  --cfg 7   --stg 1   --rescale 0.7 --steps 30                  (STG on the model's block, 28)
  DramaBox           --cfg 2.5 --stg 1.5 --rescale 0   --steps 30 --stg_blocks 29 --shift_tokens 128 --ref_mode tokens
                     (its server's automatic rescale is 0.3 at cfg 2.5, and its negative prompt is
                     "worst quality, inconsistent, robotic, distorted, noise, static, muffled, unclear,
                     unnatural, monotone")
  LAIONBox v0.4      --cfg 4.5 --stg 0 --rescale 0 --steps 50 --ref_mode adaln
"""


def add_model_args(p, required=True):
    """Flags that say which weights to load (shared with eval.py)."""
    p.add_argument("--ckpt", required=required, default="",
                   help="DiT safetensors (official, DramaBox, merged, or a train.py dit.safetensors)")
    p.add_argument("--full_ckpt", default="", help="full LTX-2 checkpoint: audio VAE + vocoder, text projection "
                   "and connector (official weights); without it the run config's codec and text stack are used")
    p.add_argument("--config", default="", help="the run's config.json / YAML, so codec, text encoder and speaker "
                   "extractors are built as for its training data (default: the --adaln file's config)")
    p.add_argument("--text_encoder", default="", help="local Gemma 3 directory (default: the run config's)")
    p.add_argument("--lora", default="", help="LoRA safetensors applied to the DiT")
    p.add_argument("--adaln", default="", help="SpeakerAdaLNZero file (adaln.safetensors from train.py)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--dtype", default="bf16", choices=sorted(files.DTYPES), help="compute dtype of the DiT")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def add_guidance_args(p):
    """Sampling flags (shared with eval.py); defaults are LTX-2.3's (ltx-core's pipelines)."""
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cfg", type=float, default=7.0, help="CFG scale against --negative_prompt (1 = off)")
    p.add_argument("--stg", type=float, default=1.0, help="STG scale (0 = off)")
    p.add_argument("--stg_blocks", default="", help="comma list of blocks whose self-attention STG skips "
                   "(default: the model's, 28 for LTX-2.3)")
    p.add_argument("--rescale", type=float, default=0.7, help="std rescale of the guided x0 (0 = off)")
    p.add_argument("--spk_cfg", type=float, default=1.0, help="speaker guidance scale: conditioned vs the same "
                   "pass without speaker (1 = off)")
    p.add_argument("--negative_prompt", default="", help="prompt of the CFG negative pass (default empty)")
    p.add_argument("--duration", default="auto", help="'auto' (DramaBox estimate from the prompt) or seconds")
    p.add_argument("--ref_mode", default="adaln", choices=REF_MODES,
                   help="speaker from --ref via SpeakerAdaLNZero deltas, DramaBox reference tokens, both, or none")
    p.add_argument("--shift_tokens", type=int, default=0, help="token count the σ-schedule shift is read from "
                   f"(0: {DEFAULT_SHIFT_TOKENS} as the reference pipelines; DramaBox: {DRAMABOX_SHIFT_TOKENS})")
    p.add_argument("--batch_size", type=int, default=4)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=PRESETS_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--ref", default="", help="reference speaker audio (3-15 s)")
    p.add_argument("--prompt", default="", help="one prompt")
    p.add_argument("--prompts", default="", help="text file, one prompt per line")
    p.add_argument("--seeds", default="42", help="comma list, e.g. 42,123,456")
    p.add_argument("--out", default="", help="output wav (one prompt and one seed)")
    p.add_argument("--out_dir", default="samples", help="output directory otherwise")
    add_guidance_args(p)
    av = p.add_argument_group("audio-video mode (the joint LTX-2 model; writes the audio and the video latents)")
    av.add_argument("--av", action="store_true", help="sample audio and video together from an AV checkpoint")
    av.add_argument("--frames", type=int, default=97, help="video frames, 1 + 8k (97: ~4 s at 24 fps)")
    av.add_argument("--size", default="192x192", help="video WIDTHxHEIGHT in pixels, multiples of 32")
    av.add_argument("--fps", type=float, default=24.0)
    av.add_argument("--video_cfg", type=float, default=3.0, help="CFG scale of the video stream (--cfg: audio's)")
    return p.parse_args(argv)


def compute_dtype(device, name):
    """The DiT's compute dtype: the flag on CUDA; fp32 on the CPU, where bf16 matmuls are emulated."""
    return files.DTYPES[name] if str(device).startswith("cuda") else torch.float32


def resolve_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: CUDA is not available")
    return name


def read_config_file(path):
    """The config dict of `--config`: a run's config.json (its "config" entry, or the whole object)
    or a YAML mapping; one clear error for anything else."""
    from config import read_yaml

    files.check_file(path, "--config")
    if not path.endswith(".json"):
        return read_yaml(path)
    try:
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
    except UnicodeDecodeError as e:
        raise ValueError(f"--config {path}: not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--config {path}: not valid JSON ({e})") from None
    stored = stored.get("config", stored) if isinstance(stored, dict) else stored
    if not isinstance(stored, dict):
        raise ValueError(f"--config {path}: not a JSON object of config keys")
    return stored


def run_config(args, adaln_meta=None):
    """The run Config that built the training data: --config, else the one stored in --adaln (the
    config that prepared its training data, else its run config; `adaln_meta` when read already),
    else the defaults; --full_ckpt / --text_encoder override its codec and text encoder."""
    from adaln import read_adaln_metadata
    from config import Config, apply_overrides

    stored, where = {}, "defaults"
    if args.config:
        stored, where = read_config_file(args.config), f"--config {args.config}"
    elif args.adaln:
        files.check_file(args.adaln, "--adaln")
        meta = adaln_meta if adaln_meta is not None else read_adaln_metadata(args.adaln)
        stored, where = meta.get("data_config") or meta.get("config") or {}, f"--adaln {args.adaln}"
    cfg = apply_overrides(Config(), stored, where)
    overrides = {}
    if args.full_ckpt:  # official codec and text projection
        overrides.update(codec="ltx", codec_ckpt=args.full_ckpt, text_ckpt=args.full_ckpt)
    if args.text_encoder:
        overrides["text_encoder"] = args.text_encoder
    return apply_overrides(cfg, overrides, "sample.py flags")


def load_dit_from_args(args, device, dtype, av=False, adaln_meta=None):
    """(run config, DiT in eval mode with --lora applied) from the CLI flags; clear errors naming the files."""
    from model import load_dit

    files.check_file(args.ckpt, "--ckpt")
    if args.full_ckpt:
        files.check_file(args.full_ckpt, "--full_ckpt")
    cfg = run_config(args, adaln_meta)
    try:
        model = load_dit(args.ckpt, av=av, device=device, dtype=dtype, strict=True)
    except files.BadFile as e:  # damaged, truncated, NaN: the message names the file and says so
        raise files.BadFile(f"--ckpt {e}") from None
    except (KeyError, RuntimeError, ValueError) as e:
        want = "--av needs an audio-video (LTX-2 / LTX-2.3 AV) checkpoint" if av else \
            "not a DiT checkpoint this model can load"
        raise ValueError(f"--ckpt {args.ckpt}: {want}:\n{e}") from e
    if args.lora:
        from lora import load_lora

        files.check_file(args.lora, "--lora")
        load_lora(model, args.lora)  # raises when its keys match no module of the model
    return cfg, model.eval()


def load_pipeline(args, device, dtype):
    """(model, codec, text_encoder, connector, adaln, speaker) from parsed CLI arguments."""
    import data
    import text

    adaln_file = None
    if args.adaln and args.ref_mode in ("adaln", "both"):  # read (and checked) before minutes of model loading
        from adaln import read_adaln_file

        files.check_file(args.adaln, "--adaln")
        adaln_file = read_adaln_file(args.adaln)
    cfg, model = load_dit_from_args(args, device, dtype, adaln_meta=adaln_file[1] if adaln_file else None)
    codec, text_encoder, speaker, _ = data.load_models(cfg, torch.device(device))
    connector = None
    for path in (args.ckpt, args.full_ckpt):  # a train.py DiT file carries its connector; else the full file
        if path:
            try:
                connector = text.load_text_connector(path, register_layout=cfg.register_layout, device=device)
                break
            except files.BadFile:  # damaged or NaN: never fall back to another connector
                raise
            except (KeyError, ValueError):
                continue
    if connector is None and not args.full_ckpt:  # a frozen connector: built as train.py built it
        connector = text.build_text_connector(cfg.model, ckpt=cfg.ckpt, register_layout=cfg.register_layout,
                                              device=device, seed=cfg.seed)
    if connector is None:
        raise ValueError(f"no text connector (audio_embeddings_connector.*) in --ckpt {args.ckpt}"
                         + (f" or --full_ckpt {args.full_ckpt}" if args.full_ckpt else "; give --full_ckpt"))
    width = model.cfg.caption_channels or model.cfg.cross_attention_dim
    text_width = connector.learnable_registers.shape[-1]
    if codec.latent_dim != model.cfg.in_channels or text_width != width:
        raise ValueError(f"--ckpt {args.ckpt} takes {model.cfg.in_channels} latent features and {width}-wide text, "
                         f"but the codec gives {codec.latent_dim} and the connector {text_width}: "
                         "give the run's --config (or --full_ckpt for official weights)")
    adaln = None
    if adaln_file is not None:
        adaln = adaln_for(args.adaln, *adaln_file, model, speaker).to(device).eval()
    return model, codec, text_encoder, connector.eval(), adaln, speaker


def load_pipeline_av(args, device, dtype):
    """(model, codec, text_encoder with both projections, (video, audio) connectors) for --av."""
    import text
    from codec import codec_from_config

    cfg, model = load_dit_from_args(args, device, dtype, av=True)
    codec = codec_from_config(cfg).to(device).eval()
    text_ckpt = cfg.text_ckpt or (args.full_ckpt or "")
    text_encoder = text.build_text_encoder(
        cfg.text_encoder, max_text_len=cfg.max_text_len, device=device, seed=cfg.seed, ckpt=text_ckpt,
        dtype=torch.bfloat16 if str(device).startswith("cuda") else torch.float32,
        dim=None if text_ckpt else model.cfg.cross_attention_dim,
        video_dim=None if text_ckpt else model.cfg.video_cross_attention_dim)
    connectors = []
    for stream in ("video", "audio"):
        for path in (args.ckpt, args.full_ckpt):
            if path:
                try:
                    connectors.append(text.load_text_connector(path, register_layout=cfg.register_layout,
                                                               device=device, stream=stream).eval())
                    break
                except files.BadFile:  # damaged or NaN: never fall back to another connector
                    raise
                except (KeyError, ValueError):
                    continue
        else:
            raise ValueError(f"no {stream}_embeddings_connector.* in --ckpt {args.ckpt}"
                             + (f" or --full_ckpt {args.full_ckpt}" if args.full_ckpt else "; give --full_ckpt"))
    if codec.latent_dim != model.cfg.in_channels:
        raise ValueError(f"--ckpt {args.ckpt} takes {model.cfg.in_channels} audio latent features, the codec gives "
                         f"{codec.latent_dim}: give the run's --config (or --full_ckpt for official weights)")
    return model, codec, text_encoder, tuple(connectors)


def adaln_for(path, state, meta, model, speaker=None):
    """The SpeakerAdaLNZero of train.py's `adaln.safetensors` at `path` (or an old `adaln.pt` that
    loads without unpickling), from its `state` and `meta` (adaln.read_adaln_file); raises naming
    the file when it does not fit `model` or was trained on the features of other speaker
    extractors than `speaker`."""
    from adaln import adaln_from_state

    module = adaln_from_state(state, meta, path, rows=model.cfg.ada_rows)
    if module.num_blocks != model.cfg.num_layers or module.rows * module.dim != model.cfg.ada_rows * model.cfg.dim:
        raise ValueError(f"--adaln {path}: {module.num_blocks} heads of width {module.rows * module.dim}, but the "
                         f"DiT has {model.cfg.num_layers} blocks of {model.cfg.ada_rows}x{model.cfg.dim}: made for "
                         "another DiT")
    if speaker is None or speaker.dim != module.in_dim:
        raise ValueError(f"--adaln {path} takes {module.in_dim}-d speaker features, the run config's extractors "
                         f"give {None if speaker is None else speaker.dim}")
    want = meta.get("speaker_fingerprint")
    if want and speaker.fingerprint() != want:
        raise ValueError(f"--adaln {path} was trained on features of other speaker extractors "
                         f"({meta.get('speaker_extractors')}, fingerprint {want}) than these ({speaker.fingerprint()})")
    return module


def sample_kwargs(args, device):
    """sample()'s keyword arguments from the guidance flags."""
    blocks = tuple(int(b) for b in args.stg_blocks.split(",") if b.strip()) or None
    return dict(steps=args.steps, cfg=args.cfg, stg=args.stg, stg_blocks=blocks, spk_cfg=args.spk_cfg,
                rescale=args.rescale, duration="auto" if args.duration == "auto" else float(args.duration),
                device=device, dtype=compute_dtype(device, args.dtype), batch_size=args.batch_size,
                ref_mode=args.ref_mode,
                negative_prompt=args.negative_prompt, shift_tokens=args.shift_tokens or None)


def main(argv=None):
    args = parse_args(argv)
    prompts = [args.prompt] if args.prompt else []
    if args.prompts:
        files.check_file(args.prompts, "--prompts")
        with open(args.prompts) as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        raise SystemExit("give --prompt or --prompts")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.out and len(prompts) * len(seeds) != 1:
        raise SystemExit("--out takes one prompt and one seed; use --out_dir for more")
    if args.ref:  # fail before minutes of model loading
        if args.ref_mode in ("adaln", "both") and not args.adaln:
            raise SystemExit(f"--ref_mode {args.ref_mode} needs --adaln (or use --ref_mode tokens)")
        check_reference(args.ref)
    device = resolve_device(args.device)
    dtype = compute_dtype(device, args.dtype)
    if args.av:
        return main_av(args, prompts, seeds, device, dtype)
    t0 = time.time()
    model, codec, text_encoder, connector, adaln, speaker = load_pipeline(args, device, dtype)
    kwargs = sample_kwargs(args, device)
    kwargs.update(dtype=dtype, ref_mode=args.ref_mode if args.ref else "none")
    items = [(p, s) for p in prompts for s in seeds]
    t1 = time.time()
    wavs = sample(model, codec, text_encoder, connector, [p for p, _ in items], seeds=[s for _, s in items],
                  ref_wavs=[args.ref or None] * len(items), adaln=adaln, speaker=speaker, **kwargs)
    seconds = time.time() - t1
    settings = dict(vars(args))
    settings.update(kwargs, dtype=str(dtype), stg_blocks=list(kwargs["stg_blocks"] or [model.cfg.stg_block]),
                    output_rate=codec.output_rate, load_seconds=round(t1 - t0, 2), sample_seconds=round(seconds, 2))
    out_dir = os.path.dirname(args.out) if args.out else args.out_dir
    os.makedirs(out_dir or ".", exist_ok=True)
    audio_seconds = 0.0
    for k, ((prompt, seed), wav) in enumerate(zip(items, wavs)):
        path = args.out or os.path.join(args.out_dir, f"{k // len(seeds):03d}_seed{seed}.wav")
        meta = dict(settings, prompt=prompt, seed=seed, ref=os.path.abspath(args.ref) if args.ref else None,
                    spoken_text=spoken_text(prompt), duration_s=wav.shape[-1] / codec.output_rate)
        audio.write_wav(path, wav, codec.output_rate, meta)
        audio_seconds += meta["duration_s"]
        print(f"wrote {path} ({meta['duration_s']:.2f} s)")
    print(f"sampled {audio_seconds:.1f} s of audio in {seconds:.1f} s (real-time factor {seconds / audio_seconds:.2f})")


def main_av(args, prompts, seeds, device, dtype):
    """sample.py --av: per item a WAV, `<name>.video_latents.pt` (ltx-trainer's latents/ layout) and a
    JSON sidecar."""
    if args.ref or args.adaln:
        raise SystemExit("--av samples without a speaker reference (--ref / --adaln are for the audio-only model)")
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--size {args.size!r}: give WIDTHxHEIGHT in pixels, e.g. 192x192") from None
    F, H, W = video_latent_shape(args.frames, height, width)  # fail before loading anything
    t0 = time.time()
    model, codec, text_encoder, connectors = load_pipeline_av(args, device, dtype)
    items = [(p, s) for p in prompts for s in seeds]
    t1 = time.time()
    results = sample_av(model, codec, text_encoder, connectors, [p for p, _ in items], seeds=[s for _, s in items],
                        frames=args.frames, height=height, width=width, fps=args.fps, steps=args.steps,
                        cfg=(args.video_cfg, args.cfg),
                        rescale=args.rescale, device=device, dtype=dtype, negative_prompt=args.negative_prompt,
                        shift_tokens=args.shift_tokens or None)
    settings = dict(vars(args), dtype=str(dtype), output_rate=codec.output_rate, load_seconds=round(t1 - t0, 2),
                    sample_seconds=round(time.time() - t1, 2), video_latent_shape=[F, H, W])
    out_dir = os.path.dirname(args.out) if args.out else args.out_dir
    os.makedirs(out_dir or ".", exist_ok=True)
    for k, ((prompt, seed), (wav, latents)) in enumerate(zip(items, results)):
        path = args.out or os.path.join(args.out_dir, f"{k // len(seeds):03d}_seed{seed}.wav")
        stem = os.path.splitext(path)[0]
        files.torch_save({"latents": latents.contiguous(), "num_frames": F, "height": H, "width": W, "fps": args.fps},
                         stem + ".video_latents.pt")
        audio.write_wav(path, wav, codec.output_rate, dict(
            settings, prompt=prompt, seed=seed, duration_s=wav.shape[-1] / codec.output_rate,
            video_latents=stem + ".video_latents.pt"))
        print(f"wrote {path} and {stem}.video_latents.pt")
    print(video_decode_hint())


if __name__ == "__main__":
    from config import run_cli

    run_cli(main)
