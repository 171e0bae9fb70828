"""Losses and their bookkeeping, as pure functions and small state objects (no model imports).

Flow matching (as ltx-trainer trains LTX-2): `x_t = (1-σ) x0 + σ ε`, the model predicts `v = ε - x0`, the loss is the
masked MSE over tokens × channels per sample. σ comes from the ltx-trainer sampler. Balancing:
`AdaptiveCoefficients` scales the stage-2 auxiliary losses against the flow loss (LAIONBox);
`EMABalancer` weighs audio against video in the joint model (ai-toolkit PR #720).
"""

import math

import torch
import torch.nn.functional as F

# The σ shift of LTX-2: linear in the token count through (1024, 0.95) and (4096, 2.05), and
# extended along that line beyond them, the same in ltx-core's LTX2Scheduler (sampling) and in
# ltx-trainer's ShiftedLogitNormalTimestepSampler (training), so one function serves both.
SHIFT_TOKENS = (1024, 4096)
SHIFT_VALUES = (0.95, 2.05)
# standard-normal quantiles that bound the stretch: 0.5th and 99.9th percentiles
Z_LOW, Z_HIGH = -2.5758, 3.0902
SIGMA_EPS = 1e-3  # stretched values below it are reflected (2·eps - σ); uniform draws start at it
UNIFORM_PROB = 0.1  # share of plain uniform draws mixed in (keeps high token counts from collapsing)
SIGMA_EDGES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def shift_for_tokens(n_tokens):
    """The shift for `n_tokens`: μ of the training σ law, s of the sampling schedule. Slope and
    intercept in ltx-core's order of operations, so the schedule equals its scheduler's bit for bit."""
    (t0, t1), (s0, s1) = SHIFT_TOKENS, SHIFT_VALUES
    slope = (s1 - s0) / (t1 - t0)
    return n_tokens * slope + (s0 - slope * t0)


def sample_sigma(batch, n_tokens, *, mode="shifted_logit_normal", generator=None, std=1.0,
                 uniform_prob=UNIFORM_PROB, eps=SIGMA_EPS, fixed_value=0.5, mu_offset=0.0):
    """σ per sample, (batch,) fp32 on the CPU (move it yourself), drawn from `generator`.

    shifted_logit_normal (ltx-trainer's default): σ = sigmoid(N(μ, std)) with μ = shift_for_tokens,
    rescaled linearly so that the 0.5th..99.9th percentiles of that law span [0, 1], values below
    eps reflected to 2·eps - σ, clamped to [0, 1]; with probability uniform_prob a U[eps, 1) draw.
    mu_offset is added to μ (0: ltx-trainer's law): > 0 moves the draws towards σ = 1, where a
    speaker-only stage 2 has its work (the voice is laid down in the first, noisiest steps).
    uniform: U[0, 1). fixed: every σ = fixed_value (overfitting and validation runs).
    The draws come in ltx-trainer's order (normal, uniform, coin), so on the same seed the values
    equal its sampler's bit for bit (checked against a copy of it outside the repo).
    """
    if mode == "fixed":
        return torch.full((batch,), float(fixed_value))
    if mode == "uniform":
        return torch.rand(batch, generator=generator)
    if mode != "shifted_logit_normal":
        raise ValueError(f"sigma_sampler: unknown mode {mode!r} (shifted_logit_normal | uniform | fixed)")
    mu = shift_for_tokens(n_tokens) + mu_offset
    sigma = torch.sigmoid(torch.randn(batch, generator=generator) * std + mu)
    lo = torch.sigmoid(torch.tensor(mu + Z_LOW * std))
    hi = torch.sigmoid(torch.tensor(mu + Z_HIGH * std))
    if hi <= lo:  # both bounds round to 1 in fp32 (~50k tokens): the stretch would divide by zero
        raise ValueError(f"sigma_sampler: {n_tokens} tokens (mu_offset {mu_offset:g}) give μ {mu:.1f}, where the "
                         "shifted logit-normal degenerates in fp32; use a shorter sequence or sigma_sampler=uniform")
    sigma = (sigma - lo) / (hi - lo)
    sigma = torch.where(sigma >= eps, sigma, 2 * eps - sigma).clamp(0, 1)
    uniform = eps + (1 - eps) * torch.rand(batch, generator=generator)
    use_uniform = torch.rand(batch, generator=generator) <= uniform_prob
    return torch.where(use_uniform, uniform, sigma)


def sample_av_sigmas(batch, n_video_tokens, n_audio_tokens, *, independent=True, mode="shifted_logit_normal",
                     generator=None, **kw):
    """(σ_video, σ_audio), each (batch,), for the joint audio-video model.

    independent=True is the official "flexible" strategy: audio gets its own draw, shifted by its
    own token count. independent=False is the old shared strategy (audio reuses the video σ).
    """
    sigma_video = sample_sigma(batch, n_video_tokens, mode=mode, generator=generator, **kw)
    if not independent:
        return sigma_video, sigma_video.clone()
    return sigma_video, sample_sigma(batch, n_audio_tokens, mode=mode, generator=generator, **kw)


def masked_mse(pred, target, mask=None):
    """MSE per sample, (B,) fp32: mean over kept tokens × channels of (pred - target)². pred, target
    (B, T, C); mask (B, T) bool, True = kept. A sample with no kept token gives 0."""
    err = (pred.float() - target.float()).square()  # (B, T, C)
    if mask is None:
        return err.mean(dim=(1, 2))
    keep = mask.to(err.dtype)[..., None]  # (B, T, 1)
    count = keep.sum(dim=(1, 2)) * err.shape[-1]
    return (err * keep).sum(dim=(1, 2)) / count.clamp_min(1)


def flow_loss(v_pred, x0, noise, mask=None):
    """Masked flow-matching loss per sample, (B,): the MSE of v_pred against v = noise - x0 over
    kept tokens (mask (B, T), True = in the loss; reference and padding tokens are False)."""
    return masked_mse(v_pred, noise.float() - x0.float(), mask)


def sigma_bucket_losses(per_sample_loss, sigma, edges=SIGMA_EDGES):
    """Mean loss per σ bucket for logging: {"0.0-0.2": value, ...}, non-empty buckets only.
    Buckets are [lo, hi), the last one closed."""
    loss, sigma = per_sample_loss.detach().float().cpu(), sigma.detach().float().cpu()
    out = {}
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        last = i == len(edges) - 2
        sel = (sigma >= lo) & ((sigma <= hi) if last else (sigma < hi))
        if sel.any():
            out[f"{lo:.1f}-{hi:.1f}"] = loss[sel].mean().item()
    return out


def _finite(x):
    return x is not None and math.isfinite(float(x.detach() if torch.is_tensor(x) else x))


class AdaptiveCoefficients:
    """EMA-balanced weights of auxiliary losses against the flow loss (LAIONBox's training code).

        ema_flow ← d·ema_flow + (1-d)·L_flow,   ema_i ← d·ema_i + (1-d)·|L_i|
        c_i = min(ratio_i · ema_flow / max(ema_i, 1e-8), cap)          (a number, no gradient)

    so each auxiliary term contributes about ratio_i × the flow loss; ratios summing to 1/6 give
    the v0.4 6:1 flow:auxiliary split. An EMA starts at its first value. A NaN/Inf auxiliary value
    is dropped and counted in `dropped`; the step falls back to the flow loss alone for it.

    train.py weights a step's losses with the coefficients of the EMAs so far (`apply`) and feeds
    the step's means, averaged over every micro-batch of every rank, to `update` after it: the
    coefficients are then the same however the global batch is split over ranks, and a term
    enters the loss from the step after its first appearance.
    """

    def __init__(self, ratios, cap=20.0, decay=0.95):
        self.ratios = {k: float(v) for k, v in ratios.items()}
        self.cap, self.decay = float(cap), float(decay)
        self.ema_flow = None
        self.ema = {k: None for k in self.ratios}
        self.dropped = {k: 0 for k in self.ratios}

    def _ema(self, old, value):
        return value if old is None else self.decay * old + (1 - self.decay) * value

    def update(self, flow, aux):
        """Feed this step's losses (tensors or floats); returns {name: c_i} for the finite aux terms."""
        unknown = set(aux) - set(self.ratios)
        if unknown:
            raise KeyError(f"auxiliary losses {sorted(unknown)} have no ratio (aux_ratios has {sorted(self.ratios)})")
        flow = float(flow)
        if _finite(flow):
            self.ema_flow = self._ema(self.ema_flow, flow)
        updated = []
        for name, value in aux.items():
            value = float(value)
            if not _finite(value):
                self.dropped[name] += 1
                continue
            self.ema[name] = self._ema(self.ema[name], abs(value))
            updated.append(name)
        current = self.coefficients()
        return {name: current[name] for name in updated if name in current}

    def coefficients(self):
        """{name: c_i} of every term with an EMA (none before the flow loss has one)."""
        if self.ema_flow is None:
            return {}
        return {name: min(self.ratios[name] * self.ema_flow / max(ema, 1e-8), self.cap)
                for name, ema in self.ema.items() if ema is not None}

    def apply(self, flow, aux):
        """(total, coefs): total = flow + Σ c_i·L_i with the current coefficients (numbers, no
        gradient), over the finite auxiliary losses that have one; NaN/Inf ones are dropped and counted."""
        current, coefs, total = self.coefficients(), {}, flow
        for name, value in aux.items():
            if name not in self.ratios:
                raise KeyError(f"auxiliary loss {name!r} has no ratio (aux_ratios has {sorted(self.ratios)})")
            if not _finite(value):
                self.dropped[name] += 1
            elif name in current:
                coefs[name] = current[name]
                total = total + current[name] * value
        return total, coefs

    def state_dict(self):
        return {"ema_flow": self.ema_flow, "ema": dict(self.ema), "dropped": dict(self.dropped)}

    def load_state_dict(self, state):
        self.ema_flow = state["ema_flow"]
        self.ema.update(state["ema"])
        self.dropped.update(state["dropped"])


class EMABalancer:
    """Audio weight of `L = L_video + w_a·L_audio`, from ai-toolkit PR #720:

        EMA_v ← d·EMA_v + (1-d)·L_video,  EMA_a ← d·EMA_a + (1-d)·L_audio      (d = 0.99)
        w_a = clamp(target · EMA_v / EMA_a, min_weight, max_weight)             (0.33, 0.05, 20)

    The clamp is two-sided (the PR's first version floored w_a at 1 and so could only boost); the
    state goes into checkpoints via state_dict (the PR reset it on resume and wrote w_a into the
    config; here it lives only in this object). An EMA starts at its first value; non-finite losses
    are skipped. Opt-in: train.py uses a fixed w_a unless asked; it weights a step with `weight`
    as of the previous steps and feeds the step's rank-averaged losses to `update` after it (the
    first step uses w_a = 1).
    """

    def __init__(self, target=0.33, decay=0.99, min_weight=0.05, max_weight=20.0):
        self.target, self.decay = float(target), float(decay)
        self.min_weight, self.max_weight = float(min_weight), float(max_weight)
        self.ema_video = self.ema_audio = None
        self.weight = 1.0

    def update(self, loss_video, loss_audio):
        """Feed this step's (detached) losses; returns the new audio weight."""
        v, a = float(loss_video), float(loss_audio)
        if _finite(v) and _finite(a):
            d = self.decay
            self.ema_video = v if self.ema_video is None else d * self.ema_video + (1 - d) * v
            self.ema_audio = a if self.ema_audio is None else d * self.ema_audio + (1 - d) * a
            ratio = self.target * self.ema_video / max(self.ema_audio, 1e-12)
            self.weight = min(max(ratio, self.min_weight), self.max_weight)
        return self.weight

    def state_dict(self):
        return {"ema_video": self.ema_video, "ema_audio": self.ema_audio, "weight": self.weight}

    def load_state_dict(self, state):
        self.ema_video, self.ema_audio, self.weight = state["ema_video"], state["ema_audio"], state["weight"]


def speaker_cosine_loss(emb, ref_emb):
    """ReFL speaker loss: 1 − cos(embedding of the generated clip, the reference's cached embedding), mean."""
    return (1 - F.cosine_similarity(emb.float(), ref_emb.float(), dim=-1)).mean()
