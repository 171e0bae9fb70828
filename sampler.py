"""The sampler: the LTX2 σ schedule, guidance on x0, the Euler denoising loop, and `sample()`,
which turns prompts (and speaker references) into waveforms with it.

The maths follows ltx-core and DramaBox: guidance on x0 (CFG against a negative prompt, STG,
speaker guidance, std rescale) with every pass of a step in ONE batched forward, Euler in fp32,
and the two ways to give the model a speaker: SpeakerAdaLNZero deltas (LAIONBox) and DramaBox
IC-LoRA reference tokens. sample.py is its command line; eval.py and pipeline.py call `sample()`.
"""

import math
import sys

import torch

import files
import losses
from duration import estimate_duration, n_latent_tokens
from model import audio_positions, audio_progress
from reference import reference_inputs

DEFAULT_SHIFT_TOKENS = 4096  # the reference pipelines pass no latent, so the shift is 2.05
# DramaBox passes its patchified (B, T, 128) latent; the scheduler counts prod(shape[2:]) = 128
# tokens whatever the length (it was written for video latents), so its shift is always ~0.63.
DRAMABOX_SHIFT_TOKENS = 128
REFERENCE_SIGMA_LAST = 0.1  # LTX2Scheduler stretches its schedule so that the last non-zero σ is 0.1


def ltx2_sigmas(steps, n_tokens=None, *, shift=None, stretch_to=REFERENCE_SIGMA_LAST):
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
# the Euler sampler


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


REF_MODES = ("adaln", "tokens", "both", "none")


def _guidance_passes(cfg, stg, spk_cfg, has_speaker):
    """The passes one step needs besides the conditioned one, in batch order (the no-speaker pass
    last: `denoise` drops it at the steps outside the guidance interval)."""
    passes = ["cond"]
    if cfg != 1.0:
        passes.append("uncond")
    if stg != 0.0:
        passes.append("stg")
    if spk_cfg != 1.0 and has_speaker:
        passes.append("nospk")
    return passes


def _pass_inputs(passes, T, context, neg_context, ref_latent, deltas, text_progress, neg_text_progress, dtype,
                 device):
    """The model inputs that stay the same over the steps, one block of B rows per pass, pass-major
    (P*B, ...): context, positions, attention mask, STG rows, AdaLN deltas, progress tables, and the
    clean reference tokens (`ref`; None without a reference)."""
    B, P, Tr = context.shape[0], len(passes), 0 if ref_latent is None else ref_latent.shape[1]
    rep = lambda t: torch.cat([t] * P) if t is not None else None  # noqa: E731
    positions = audio_positions(T, B).to(device)  # (B, T) seconds
    attn_mask = None
    if Tr:
        positions = torch.cat([positions, audio_positions(Tr, B, offset_s=0.5).to(device)], dim=1)
        masks = [reference_mask(T, Tr, see_ref=p != "nospk") for p in passes]
        attn_mask = torch.stack(masks).repeat_interleave(B, 0).to(device)  # (P*B, n, n)
    out = {"context": torch.cat([neg_context if p == "uncond" else context for p in passes]).to(dtype),
           "positions": rep(positions), "attn_mask": attn_mask, "ref": rep(ref_latent.float()) if Tr else None,
           "stg_samples": torch.tensor([p == "stg" for p in passes], device=device).repeat_interleave(B)
           if "stg" in passes else None,
           "block_deltas": None if deltas is None else
           torch.cat([torch.zeros_like(deltas) if p == "nospk" else deltas for p in passes]),
           "text_progress": None, "audio_progress": None}
    if text_progress is not None:
        out["text_progress"] = torch.cat([neg_text_progress if p == "uncond" else text_progress
                                          for p in passes]).to(device)
        out["audio_progress"] = rep(audio_progress([T] * B, T + Tr)).to(device)
    return out


@torch.no_grad()
def denoise(model, noise, context, neg_context, *, sigmas, ref_latent=None, deltas=None,
            cfg=1.0, stg=0.0, stg_blocks=(), spk_cfg=1.0, rescale=0.0, dtype=torch.float32,
            eta=0.0, fresh_noise=None, progress=None, text_progress=None, neg_text_progress=None,
            spk_sigma=(0.0, 1.0)):
    """Run the Euler sampler from `noise` (B, T, F) to x0 (B, T, F), fp32.

    context / neg_context: (B, L, D) connector outputs of the prompts and the negative prompt.
    text_progress / neg_text_progress: (B, L) the prompts' and the negative prompt's token progress
    (`TextEncoder.progress`) for a DiT with a progress rope, else None.
    ref_latent: (B, Tr, F) clean reference tokens appended after the target (σ = 0, +0.5 s
    positions, asymmetric mask) or None. deltas: (B, blocks, rows*D) SpeakerAdaLNZero deltas or None.
    Every pass (cond, uncond, STG, no-speaker) goes into one forward of batch P*B per step.

    eta: share of the noise drawn afresh at every step (0: the deterministic Euler sampler of the
    reference pipelines). A step writes x_t = (1-σ) x0 + σ ε; Euler carries the step's implied
    noise ε̂ = (x - (1-σ) x0̂) / σ to the next σ unchanged, x' = (1-σ') x0̂ + σ' ε̂. With eta > 0
    it carries √(1-η²) ε̂ + η z instead, z = fresh_noise() (B, T, F): a knob between a deterministic
    and a stochastic sampler, as DDIM's η is; at η = 1 every step's estimate is re-noised from
    scratch (a consistency model's multistep sampler). The fresh draws pull the path back towards
    noise the model was trained on, where a small model's deterministic path drifts.

    spk_sigma: (low, high) σ range of the steps that take speaker guidance (a guidance interval,
    Kynkäänniemi et al. 2024); the others run without the no-speaker pass. The voice is laid down
    in the noisy steps; guidance in the last ones only pushes the fine detail off what the model makes.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if eta and fresh_noise is None:
        raise ValueError("eta > 0 needs fresh_noise (a function returning (B, T, F) noise)")
    B, T, _ = noise.shape
    Tr = 0 if ref_latent is None else ref_latent.shape[1]
    passes = _guidance_passes(cfg, stg, spk_cfg, ref_latent is not None or deltas is not None)
    inputs = _pass_inputs(passes, T, context, neg_context, ref_latent, deltas, text_progress, neg_text_progress,
                          dtype, noise.device)
    ref = inputs.pop("ref")

    x = noise.float()
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        # outside the guidance interval the no-speaker pass (always the last) is left out of the batch
        n = len(passes) - ("nospk" in passes and not spk_sigma[0] <= sigma <= spk_sigma[1])
        x_in = torch.cat([x] * n)
        sig = torch.full((n * B,), sigma, device=x.device)
        timesteps = None
        if Tr:  # per-token σ: the reference tokens are clean
            x_in = torch.cat([x_in, ref[:n * B]], dim=1)
            timesteps = torch.cat([sig[:, None].expand(-1, T), torch.zeros(n * B, Tr, device=x.device)], dim=1)
        # σ stays fp32: the timestep embedding is computed in fp32 (as the reference) whatever the dtype
        v = model(x_in.to(dtype), sig, timesteps=timesteps, stg_blocks=tuple(stg_blocks) if "stg" in passes else (),
                  **{k: None if t is None else t[:n * B] for k, t in inputs.items()})
        x0 = (x_in[:, :T] - sigma * v[:, :T].float()).view(n, B, T, -1)  # x0 = x_t - σ v, fp32
        parts = dict(zip(passes[:n], x0.unbind(0)))
        pred = guided_x0(parts["cond"], parts.get("uncond"), parts.get("stg"), parts.get("nospk"),
                         cfg=cfg, stg=stg, spk_cfg=spk_cfg, rescale=rescale)
        if eta and sigma_next > 0:
            implied = (x - (1 - sigma) * pred) / sigma
            x = (1 - sigma_next) * pred + sigma_next * (math.sqrt(1 - eta * eta) * implied + eta * fresh_noise())
        else:  # Euler on the velocity implied by the guided x0, as the reference's stepper
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


def equal_shape_batches(T, ref_lat, ref_deltas, batch_size):
    """Item indices in batches of up to `batch_size` items of equal shape (target length `T[i]`,
    reference length, with or without speaker deltas), keeping the items' order within a shape."""
    groups = {}
    for i in range(len(T)):
        key = (T[i], None if ref_lat[i] is None else ref_lat[i].shape[1], ref_deltas[i] is not None)
        groups.setdefault(key, []).append(i)
    return [idx[j:j + batch_size] for idx in groups.values() for j in range(0, len(idx), batch_size)]


@torch.no_grad()
def sample(model, codec, text_encoder, connector, prompts, *, seeds, ref_wavs=None, ref_mode="adaln",
           adaln=None, speaker=None, steps=30, cfg=7.0, stg=1.0, stg_blocks=None, spk_cfg=1.0,
           rescale=0.7, duration="auto", device="cpu", dtype=torch.float32, batch_size=4,
           negative_prompt="", shift_tokens=None, sigma_last=REFERENCE_SIGMA_LAST, temperature=1.0, eta=0.0,
           progress=True, spk_sigma=(0.0, 1.0)):
    """Generate one waveform per (prompt, seed[, reference]) item; returns a list of (C, N) tensors
    at `codec.output_rate`, in the order of `prompts`.

    prompts, seeds: equal-length lists (one item each). ref_wavs: None, or per item None / a path /
    a (C, N) tensor at codec.sample_rate. ref_mode: adaln (SpeakerAdaLNZero deltas from `speaker`
    features through `adaln`), tokens (DramaBox reference tokens), both, none. duration: "auto"
    (DramaBox estimate), seconds, or a per-item list. Items of equal length share a batch of up to
    `batch_size`; each item's noise comes from its own generator seeded with its seed, so an item's
    audio does not depend on what else is in its batch. stg_blocks: None = the model's STG block.
    shift_tokens: token count of the σ-schedule shift (None: 4096, the reference pipelines').
    sigma_last: the last non-zero σ of the schedule (`ltx2_sigmas`' stretch_to; 0.1 as the reference
    pipelines'): the final step goes from it to 0 in one x0 estimate.
    temperature: scale of the starting noise (1: the reference pipelines'). Below 1 the sampler starts
    nearer the middle of the noise distribution: less varied, cleaner audio from a model too small or
    too briefly trained to make its whole distribution well (Grad-TTS and Matcha-TTS sample at 0.667).
    eta: the share of fresh noise per step (`denoise`), drawn from the item's own generator after
    its starting noise and scaled by `temperature`; eta = 0 draws nothing more, so the samples
    are those of the deterministic sampler bit for bit.
    spk_sigma: (low, high) σ range of the steps that take speaker guidance (`denoise`; (0, 1): all).
    """
    if ref_mode not in REF_MODES:
        raise ValueError(f"ref_mode must be one of {REF_MODES}, got {ref_mode!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < sigma_last < 1:
        raise ValueError(f"sigma_last must be in (0, 1), got {sigma_last}")
    if len(spk_sigma) != 2 or not 0 <= spk_sigma[0] <= spk_sigma[1] <= 1:
        raise ValueError(f"spk_sigma must be (low, high) with 0 <= low <= high <= 1, got {tuple(spk_sigma)}")
    n = len(prompts)
    seeds = _as_list(seeds, n, "seeds")
    refs = _as_list(ref_wavs, n, "ref_wavs")
    durations = _as_list(duration, n, "duration")
    if ref_mode in ("adaln", "both") and any(r is not None for r in refs) and (adaln is None or speaker is None):
        raise ValueError(f"ref_mode={ref_mode!r} needs a SpeakerAdaLNZero (--adaln) and speaker extractors")
    dtype = files.DTYPES[dtype] if isinstance(dtype, str) else dtype
    stg_blocks = (model.cfg.stg_block,) if stg_blocks is None else tuple(stg_blocks)

    # Reference latents / speaker deltas per item, computed once.
    ref_lat, ref_deltas = reference_inputs(refs, ref_mode, codec, adaln, speaker, device)

    T = [n_latent_tokens(estimate_duration(p) if d == "auto" else float(d)) for p, d in zip(prompts, durations)]
    batches = equal_shape_batches(T, ref_lat, ref_deltas, batch_size)

    F_lat = model.cfg.in_channels  # latent features per token
    total_steps = steps * len(batches)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, desc="sampling", unit="step", disable=not sys.stderr.isatty())
    out = [None] * n
    for idx in batches:
        t = T[idx[0]]
        gens = [torch.Generator().manual_seed(int(seeds[i])) for i in idx]

        def draw(t=t, gens=gens):  # (B, T, F) × temperature, each item from its own generator, on CPU (any device)
            return temperature * torch.stack([torch.randn(t, F_lat, generator=g) for g in gens]).to(device)

        noise = draw()
        context, neg_context, text_prog, neg_prog = prompt_inputs(model, text_encoder, connector,
                                                                  [prompts[i] for i in idx], negative_prompt)
        ref = torch.cat([ref_lat[i] for i in idx]) if ref_lat[idx[0]] is not None else None
        deltas = torch.cat([ref_deltas[i] for i in idx]) if ref_deltas[idx[0]] is not None else None
        sigmas = ltx2_sigmas(steps, shift_tokens, stretch_to=sigma_last)
        x0 = denoise(model, noise, context, neg_context, sigmas=sigmas, ref_latent=ref, deltas=deltas,
                     cfg=cfg, stg=stg, stg_blocks=stg_blocks, spk_cfg=spk_cfg, rescale=rescale,
                     dtype=dtype, eta=eta, fresh_noise=draw, progress=bar, text_progress=text_prog,
                     neg_text_progress=neg_prog, spk_sigma=tuple(spk_sigma))
        wav = codec.decode(x0).float().cpu()  # (B, C, N)
        check_generated(x0, wav)
        for j, i in enumerate(idx):
            out[i] = wav[j]
    if bar is not None:
        bar.close()
    return out


def prompt_inputs(model, text_encoder, connector, prompts, negative_prompt):
    """(context (B, L, D), neg_context (B, L, D), text_progress (B, L), neg_text_progress (B, L)) of a
    batch of prompts and the negative prompt; the progress tables are None unless the DiT has a
    progress rope (`model.DiTConfig.text_progress_theta`)."""
    B, texts = len(prompts), list(prompts) + [negative_prompt]
    feats, mask = text_encoder.encode(texts)
    ctx_all = connector(feats, mask).float()  # (B+1, L, D)
    if not model.cfg.text_progress_theta:
        return ctx_all[:-1], ctx_all[-1:].expand(B, -1, -1), None, None
    if connector.register_layout != "official":  # the progress is laid out where the tokens are
        raise ValueError("a DiT with a progress rope needs the connector's official register layout")
    prog_all = text_encoder.progress(texts)
    return ctx_all[:-1], ctx_all[-1:].expand(B, -1, -1), prog_all[:-1], prog_all[-1:].expand(B, -1)


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
