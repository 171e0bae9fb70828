"""Sampling the joint audio-video model: both streams denoised together on one σ schedule, the
audio decoded to a waveform and the video left as latents (decoding them needs ltx-core's video VAE).
"""

import torch

from duration import n_latent_tokens
from model import video_positions
from sampler import guided_x0, ltx2_sigmas

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
