"""sample.py against ltx-core 1.0.0: σ schedule, guider, the reference-token path through the
reference LTXModel, Euler; plus one forward per step, per-seed determinism and the DramaBox
duration table. Tiny fp32 models, CPU, well under a minute."""

import json
import math

import numpy as np
import pytest
import torch
from ltx_core.components.diffusion_steps import EulerDiffusionStep
from ltx_core.components.guiders import MultiModalGuider, MultiModalGuiderParams
from ltx_core.components.patchifiers import AudioPatchifier
from ltx_core.components.schedulers import LTX2Scheduler
from ltx_core.guidance.perturbations import (BatchedPerturbationConfig, Perturbation, PerturbationConfig,
                                             PerturbationType)
from ltx_core.model.transformer.modality import Modality
from ltx_core.model.transformer.model import LTXModel, LTXModelType, X0Model
from ltx_core.model.transformer.rope import LTXRopeType

import duration
import reference
import sample
import sampler
from model import PRESETS, AudioDiT

F_LAT = PRESETS["micro"].in_channels  # 16 features per token in the micro preset


# -----------------------------------------------------------------------------------------------
# schedule


@pytest.mark.parametrize("steps", [2, 8, 30, 50])
@pytest.mark.parametrize("n_tokens", [None, 75, 250, 1024, 4096, 6000])
def test_sigmas_equal_ltx2_scheduler(steps, n_tokens):
    latent = None if n_tokens is None else torch.zeros(1, 1, n_tokens)  # tokens = prod(shape[2:])
    want = LTX2Scheduler().execute(steps=steps, latent=latent)
    got = sampler.ltx2_sigmas(steps, n_tokens)
    assert got.dtype == torch.float32 and got.shape == (steps + 1,)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-7)
    assert got[-1] == 0
    if steps > 1:
        assert abs(got[0].item() - 1) < 1e-6
        assert abs(got[-2].item() - 0.1) < 1e-6  # stretched so the last non-zero σ is 0.1


def test_sigmas_dramabox_token_count():
    """DramaBox hands the scheduler its patchified (B, T, 128) latent, whose prod(shape[2:]) is 128
    whatever T is: its 'real count' is always 128 tokens (shift ~0.63)."""
    for T in (100, 400):
        want = LTX2Scheduler().execute(steps=30, latent=torch.zeros(1, T, 128))
        torch.testing.assert_close(sampler.ltx2_sigmas(30, sampler.DRAMABOX_SHIFT_TOKENS), want, rtol=0, atol=2e-7)


def test_sigmas_fixed_shift_and_no_stretch():
    want = LTX2Scheduler().execute(steps=12, max_shift=1.3, base_shift=1.3, stretch=False)
    torch.testing.assert_close(sampler.ltx2_sigmas(12, shift=1.3, stretch_to=None), want, rtol=0, atol=2e-7)


# -----------------------------------------------------------------------------------------------
# guidance


@pytest.mark.parametrize("cfg,stg,spk,rescale", [(7.0, 1.0, 1.0, 0.7), (2.5, 1.5, 1.0, 0.0),
                                                   (4.5, 0.0, 3.0, 0.0), (3.0, 0.5, 2.0, 1.0)])
def test_guided_x0_equals_reference_guider(cfg, stg, spk, rescale):
    g = torch.Generator().manual_seed(0)
    c, u, p, m = (torch.randn(3, 40, 16, generator=g) for _ in range(4))
    guider = MultiModalGuider(MultiModalGuiderParams(cfg_scale=cfg, stg_scale=stg, rescale_scale=rescale,
                                                     modality_scale=spk))
    got = sampler.guided_x0(c, u, p, m, cfg=cfg, stg=stg, spk_cfg=spk, rescale=rescale)
    for b in range(3):  # the reference's std is over its whole tensor: one sample at a time
        want = guider.calculate(c[b:b + 1], u[b:b + 1], p[b:b + 1], m[b:b + 1])
        torch.testing.assert_close(got[b:b + 1], want, rtol=1e-5, atol=1e-5)


def test_guided_x0_leaves_out_missing_terms():
    g = torch.Generator().manual_seed(1)
    c, u = torch.randn(2, 10, 4, generator=g), torch.randn(2, 10, 4, generator=g)
    guider = MultiModalGuider(MultiModalGuiderParams(cfg_scale=3.0))
    torch.testing.assert_close(sampler.guided_x0(c, u, cfg=3.0), guider.calculate(c, u, 0.0, 0.0))
    assert torch.equal(sampler.guided_x0(c), c)


# -----------------------------------------------------------------------------------------------
# tiny models: ours and the reference with the same weights


def _tiny_dit(seed=0):
    torch.manual_seed(seed)
    model = AudioDiT(PRESETS["micro"]).eval()
    with torch.no_grad():  # random everything (the zero init would make v = 0)
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def _reference_dit(model):
    c = model.cfg
    ref = LTXModel(model_type=LTXModelType.AudioOnly, num_layers=c.num_layers, audio_num_attention_heads=c.heads,
                   audio_attention_head_dim=c.head_dim, audio_in_channels=c.in_channels,
                   audio_out_channels=c.in_channels, audio_cross_attention_dim=c.cross_attention_dim,
                   rope_type=LTXRopeType.SPLIT, double_precision_rope=True, apply_gated_attention=True,
                   cross_attention_adaln=True, audio_positional_embedding_max_pos=[20]).eval()
    ref.load_state_dict(model.state_dict(), strict=True)
    return ref


def test_reference_token_path_equals_ltx_core():
    """Our Euler loop with DramaBox reference tokens == ltx-core's X0Model + EulerDiffusionStep on
    the same appended tokens (σ = 0 per token, positions +0.5 s, asymmetric [0, 1] mask)."""
    model = _tiny_dit()
    ref_model = X0Model(_reference_dit(model))
    B, T, Tr, L = 2, 12, 7, 5
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(B, T, F_LAT, generator=g)
    ref_lat = torch.randn(B, Tr, F_LAT, generator=g)
    ctx = torch.randn(B, L, model.cfg.cross_attention_dim, generator=g)
    sigmas = sampler.ltx2_sigmas(3, T)

    got = sampler.denoise(model, noise, ctx, ctx, sigmas=sigmas, ref_latent=ref_lat, cfg=1.0, stg=0.0)

    patchifier = AudioPatchifier(patch_size=1)
    positions = torch.cat([patchifier._compute_audio_timings(B, T), patchifier._compute_audio_timings(B, Tr) + 0.5],
                          dim=2)  # (B, 1, T+Tr, 2) seconds, DramaBox's AudioConditionByReferenceLatent
    mask = torch.zeros(B, T + Tr, T + Tr)
    mask[:, :T, :] = 1.0  # target -> everything
    mask[:, T:, T:] = 1.0  # reference -> reference only
    denoise_mask = torch.cat([torch.ones(B, T, 1), torch.zeros(B, Tr, 1)], dim=1)
    x = torch.cat([noise, ref_lat], dim=1)
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        audio = Modality(latent=x, sigma=sigma.expand(B), timesteps=denoise_mask * sigma, positions=positions,
                         context=ctx, attention_mask=mask)
        with torch.no_grad():
            _, x0 = ref_model(None, audio, BatchedPerturbationConfig.empty(B))
        x = EulerDiffusionStep().step(x, x0, sigmas, i)
    torch.testing.assert_close(x[:, T:], ref_lat)  # the reference tokens never move
    torch.testing.assert_close(got, x[:, :T], rtol=1e-4, atol=1e-4)


class CountingModel(torch.nn.Module):
    """Wraps a model and records the batch size of every forward."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []
        self.cfg = model.cfg

    def forward(self, x, *args, **kwargs):
        self.calls.append(x.shape[0])
        return self.model(x, *args, **kwargs)


def test_one_forward_per_step_equals_separate_reference_passes():
    """cond + negative prompt + STG + no-speaker in one forward of 4B per step, and the result equals
    four separate reference-model passes combined by ltx-core's guider and Euler step."""
    model = _tiny_dit(1)
    ref_model = X0Model(_reference_dit(model))
    B, T, L = 2, 10, 4
    D, rows = model.cfg.dim, model.cfg.ada_rows
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(B, T, F_LAT, generator=g)
    ctx, neg = torch.randn(2, B, L, model.cfg.cross_attention_dim, generator=g)
    deltas = 0.3 * torch.randn(B, model.cfg.num_layers, rows * D, generator=g)
    sigmas = sampler.ltx2_sigmas(3)
    kw = dict(cfg=3.0, stg=1.0, stg_blocks=(1,), spk_cfg=2.0, rescale=0.7)

    counting = CountingModel(model)
    got = sampler.denoise(counting, noise, ctx, neg, sigmas=sigmas, deltas=deltas, **kw)
    assert counting.calls == [4 * B] * 3  # one forward per step carrying every guidance pass

    # ltx-core takes no speaker deltas, so the passes that carry them (cond, uncond, STG) are our
    # model's, run one at a time; the no-speaker pass and STG itself come from the reference model,
    # and guidance + Euler from ltx-core's guider and stepper.
    positions = AudioPatchifier(patch_size=1)._compute_audio_timings(B, T)
    guider = MultiModalGuider(MultiModalGuiderParams(cfg_scale=3.0, stg_scale=1.0, rescale_scale=0.7,
                                                     modality_scale=2.0, stg_blocks=[1]))
    stg = BatchedPerturbationConfig([PerturbationConfig([Perturbation(PerturbationType.SKIP_AUDIO_SELF_ATTN, [1])])
                                     for _ in range(B)])
    x = noise.clone()
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        audio = lambda c: Modality(latent=x, sigma=sigma.expand(B), timesteps=sigma.expand(B, T, 1),  # noqa: E731
                                   positions=positions, context=c)
        with torch.no_grad():
            _, m = ref_model(None, audio(ctx), BatchedPerturbationConfig.empty(B))  # no speaker = backbone
            sig = sigma.expand(B)
            c = x - sigma * model(x, sig, ctx, block_deltas=deltas)
            u = x - sigma * model(x, sig, neg, block_deltas=deltas)
            p = x - sigma * model(x, sig, ctx, block_deltas=deltas, stg_blocks=(1,))
            _, p_nospk = ref_model(None, audio(ctx), stg)
            p_ours_nospk = x - sigma * model(x, sig, ctx, stg_blocks=(1,))
            torch.testing.assert_close(p_ours_nospk, p_nospk, rtol=1e-4, atol=1e-4)  # STG = reference STG
        pred = torch.cat([guider.calculate(c[b:b + 1], u[b:b + 1], p[b:b + 1], m[b:b + 1]) for b in range(B)])
        x = EulerDiffusionStep().step(x, pred, sigmas, i)
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-4)


def test_guidance_interval_guides_only_its_steps():
    """spk_sigma (low, high): the steps whose σ lies in it take speaker guidance (a forward of 2B:
    cond + no speaker), the others run the conditioned pass alone (B); the result equals running the
    schedule's two parts one after the other, the first guided and the second not (Euler, eta 0)."""
    model = _tiny_dit(2)
    B, T, L = 2, 10, 4
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(B, T, F_LAT, generator=g)
    ctx = torch.randn(B, L, model.cfg.cross_attention_dim, generator=g)
    deltas = 0.3 * torch.randn(B, model.cfg.num_layers, model.cfg.ada_rows * model.cfg.dim, generator=g)
    sigmas = sampler.ltx2_sigmas(6, 40, stretch_to=0.02)  # 1, 0.89, 0.75, 0.58, 0.35, 0.02, 0
    k = int((sigmas >= 0.45).sum())  # steps 0..k-1 start at σ >= 0.45
    assert 0 < k < len(sigmas) - 1
    kw = dict(deltas=deltas, spk_cfg=3.0)
    counting = CountingModel(model)
    got = sampler.denoise(counting, noise, ctx, ctx, sigmas=sigmas, spk_sigma=(0.45, 1.0), **kw)
    assert counting.calls == [2 * B] * k + [B] * (len(sigmas) - 1 - k)
    first = sampler.denoise(model, noise, ctx, ctx, sigmas=sigmas[:k + 1], **kw)
    want = sampler.denoise(model, first, ctx, ctx, sigmas=sigmas[k:], deltas=deltas, spk_cfg=1.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    guided_all = sampler.denoise(model, noise, ctx, ctx, sigmas=sigmas, **kw)
    assert not torch.allclose(got, guided_all, atol=1e-3)  # the interval changed the result
    assert torch.equal(sampler.denoise(model, noise, ctx, ctx, sigmas=sigmas, spk_sigma=(0.0, 1.0), **kw), guided_all)


# -----------------------------------------------------------------------------------------------
# sample(): determinism per seed, shapes, errors


class FakeCodec(torch.nn.Module):
    """Test double for codec.py's codec: 640 samples @ 16 kHz per latent (25/s), stereo."""

    sample_rate = output_rate = 16000
    tokens_per_second = 25
    channels = 2

    def encode(self, wav):  # (B, C, N) -> (B, T, F)
        B, C, N = wav.shape
        frames = wav[..., : N // 640 * 640].reshape(B, C, -1, 640)
        return frames[..., :F_LAT].mean(1).contiguous()

    def decode(self, lat):  # (B, T, F) -> (B, 2, T*640)
        wav = lat.repeat_interleave(40, dim=-1).flatten(1).tanh()
        return torch.stack([wav, -wav], dim=1)


class FakeText:
    """Test double for text.py: byte features of the prompt, padded to 8 tokens."""

    def encode(self, prompts):
        feats = torch.zeros(len(prompts), 8, PRESETS["micro"].cross_attention_dim)
        mask = torch.zeros(len(prompts), 8, dtype=torch.bool)
        for i, p in enumerate(prompts):
            b = torch.tensor(list(p.encode()[:8]), dtype=torch.float32)
            feats[i, : len(b)] = (b[:, None] / 255.0) * torch.linspace(-1, 1, feats.shape[-1])
            mask[i, : len(b)] = True
        return feats, mask


def fake_connector(feats, mask):
    return feats * mask[..., None]


def _sample(model, prompts, seeds, **kw):
    args = dict(steps=2, cfg=2.0, stg=1.0, stg_blocks=(1,), rescale=0.7, duration=0.4, batch_size=4,
                progress=False)
    args.update(kw)
    return sampler.sample(model, FakeCodec(), FakeText(), fake_connector, prompts, seeds=seeds, **args)


def test_same_seed_same_audio_regardless_of_batch():
    model = _tiny_dit(2)
    prompts = ["a 'Hello there, how are you today?'", "b: fine", "c"]
    together = _sample(model, prompts, [42, 123, 7])
    alone = _sample(model, prompts[1:2], [123], batch_size=1)
    assert len(together) == 3 and together[0].shape == (2, 10 * 640)  # 0.4 s -> 10 latents
    torch.testing.assert_close(together[1], alone[0], rtol=1e-4, atol=1e-4)  # batch size changes only fp rounding
    again = _sample(model, prompts[::-1], [7, 123, 42], batch_size=2)
    torch.testing.assert_close(again[2], together[0], rtol=1e-4, atol=1e-4)  # batch size changes only fp rounding
    assert not torch.allclose(together[0], _sample(model, prompts[:1], [43])[0])  # the seed matters


def test_temperature_scales_the_starting_noise(monkeypatch):
    seen = []
    real_denoise = sampler.denoise

    def spy(model, noise, *args, **kwargs):
        seen.append(noise.clone())
        return real_denoise(model, noise, *args, **kwargs)

    monkeypatch.setattr(sampler, "denoise", spy)
    model = _tiny_dit(4)
    plain = _sample(model, ["x", "y"], [3, 4])
    cool = _sample(model, ["x", "y"], [3, 4], temperature=0.5)
    torch.testing.assert_close(seen[1], 0.5 * seen[0], rtol=0, atol=0)  # the same draw, scaled
    assert seen[0].std() > 0.5 and not torch.allclose(plain[0], cool[0])
    with pytest.raises(ValueError, match="temperature"):
        _sample(model, ["x"], [3], temperature=0.0)


def test_sigma_last_and_shift_set_the_schedule(monkeypatch):
    """sample() runs ltx2_sigmas(steps, shift_tokens, stretch_to=sigma_last): by default the reference's
    schedule (shift of 4096 tokens, last σ 0.1); sigma_last outside (0, 1) is refused."""
    seen = []
    real_denoise = sampler.denoise

    def spy(model, noise, *args, sigmas, **kwargs):
        seen.append(sigmas.clone())
        return real_denoise(model, noise, *args, sigmas=sigmas, **kwargs)

    monkeypatch.setattr(sampler, "denoise", spy)
    model = _tiny_dit(4)
    _sample(model, ["x"], [3], steps=6)
    _sample(model, ["x"], [3], steps=6, shift_tokens=40, sigma_last=0.02)
    torch.testing.assert_close(seen[0], sampler.ltx2_sigmas(6, 4096, stretch_to=0.1), rtol=0, atol=0)
    torch.testing.assert_close(seen[1], sampler.ltx2_sigmas(6, 40, stretch_to=0.02), rtol=0, atol=0)
    assert seen[1][-2].item() == pytest.approx(0.02, abs=1e-6) and seen[1][-1] == 0
    assert (seen[1][1:-1] < seen[0][1:-1]).all()  # a smaller shift spends more of the steps at low σ
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="sigma_last"):
            _sample(model, ["x"], [3], sigma_last=bad)
    for bad in ((0.5, 0.4), (-0.1, 1.0), (0.5,)):
        with pytest.raises(ValueError, match="spk_sigma must be"):
            _sample(model, ["x"], [3], spk_sigma=bad)
    assert sample.parse_spk_sigma("0.45,1") == (0.45, 1.0)
    for bad in ("0.45", "a,b", "0.1,0.2,0.3"):
        with pytest.raises(ValueError, match=f"--spk_sigma '{bad}': expected LOW,HIGH"):
            sample.parse_spk_sigma(bad)


class ConstantV(torch.nn.Module):
    """A stand-in DiT whose velocity is a fixed tensor: x0̂ = x_t - σ v is known at every step."""

    def __init__(self, v):
        super().__init__()
        self.v = v

    def forward(self, x, sigma, *args, **kwargs):
        return self.v.expand_as(x)


def test_eta_step_renoises_the_x0_estimate():
    """One step from σ to σ' with eta: x' = (1-σ') x0̂ + σ' (√(1-η²) ε̂ + η z), ε̂ = (x - (1-σ) x0̂)/σ;
    eta = 0 is the Euler step; the last step (σ' = 0) returns x0̂ and draws nothing."""
    g = torch.Generator().manual_seed(0)
    x, v, z = (torch.randn(2, 5, 4, generator=g) for _ in range(3))
    ctx = torch.zeros(2, 3, 8)
    sigma, nxt = 0.8, 0.5
    x0 = x - sigma * v
    eps = (x - (1 - sigma) * x0) / sigma
    draws = []

    def fresh():
        draws.append(1)
        return z

    for eta in (0.0, 0.3, 1.0):
        got = sampler.denoise(ConstantV(v), x, ctx, ctx, sigmas=torch.tensor([sigma, nxt]), eta=eta, fresh_noise=fresh)
        want = (1 - nxt) * x0 + nxt * (math.sqrt(1 - eta ** 2) * eps + eta * z)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    euler = sampler.denoise(ConstantV(v), x, ctx, ctx, sigmas=torch.tensor([sigma, nxt]))
    torch.testing.assert_close(euler, x + (nxt - sigma) * v, rtol=1e-6, atol=1e-6)  # η = 0: the Euler step
    assert len(draws) == 2  # η = 0 draws nothing
    last = sampler.denoise(ConstantV(v), x, ctx, ctx, sigmas=torch.tensor([sigma, 0.0]), eta=1.0, fresh_noise=fresh)
    torch.testing.assert_close(last, x0, rtol=1e-6, atol=1e-6)
    assert len(draws) == 2
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="eta"):
            sampler.denoise(ConstantV(v), x, ctx, ctx, sigmas=torch.tensor([sigma, nxt]), eta=bad, fresh_noise=fresh)
    with pytest.raises(ValueError, match="fresh_noise"):
        sampler.denoise(ConstantV(v), x, ctx, ctx, sigmas=torch.tensor([sigma, nxt]), eta=0.5)


def test_eta_noise_comes_from_each_items_seed():
    """With eta the fresh noise is drawn from the item's own generator: a sample does not depend on its
    batch, changes with eta, and eta = 0 leaves the deterministic samples as they were."""
    model = _tiny_dit(5)
    prompts = ["a 'one two'", "b 'three'", "c"]
    kw = dict(steps=3, eta=0.5, temperature=0.6)
    together = _sample(model, prompts, [11, 12, 13], **kw)
    alone = _sample(model, prompts[2:], [13], batch_size=1, **kw)
    torch.testing.assert_close(together[2], alone[0], rtol=1e-4, atol=1e-4)  # batch size changes only fp rounding
    plain = _sample(model, prompts, [11, 12, 13], steps=3, temperature=0.6)
    zero = _sample(model, prompts, [11, 12, 13], steps=3, temperature=0.6, eta=0.0)
    for a, b, c in zip(plain, zero, together):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not torch.allclose(a, c, atol=1e-3)


def test_reference_tokens_and_durations_in_sample():
    model = _tiny_dit(3)
    g = torch.Generator().manual_seed(5)
    ref = 0.1 * torch.randn(2, 16000 * 2, generator=g)  # 2 s of stereo noise at 16 kHz
    out = _sample(model, ["x", "y"], [1, 1], ref_wavs=[ref, None], ref_mode="tokens", duration=[0.4, 0.8])
    assert out[0].shape[-1] == 10 * 640 and out[1].shape[-1] == 20 * 640
    plain = _sample(model, ["x"], [1], duration=0.4)
    assert not torch.allclose(out[0], plain[0])  # the reference changes the result


def test_reference_errors(tmp_path):
    with pytest.raises(ValueError, match="at least"):
        reference.prepare_reference(torch.randn(1, 8000), 16000, name="short.wav")
    with pytest.raises(ValueError, match="silent"):
        reference.prepare_reference(torch.zeros(2, 48000), 16000, name="quiet.wav")
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"not a wav at all")
    with pytest.raises((ValueError, FileNotFoundError), match="broken.wav"):
        reference.load_reference(str(bad), 16000, 2)
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        reference.load_reference(str(tmp_path / "missing.wav"), 16000, 2)
    wav = reference.prepare_reference(0.01 * torch.randn(2, 16000 * 12), 16000)
    assert wav.shape[-1] == 16000 * 10 and math.isclose(wav.abs().max().item(), 10 ** (-4 / 20), rel_tol=1e-6)


def test_reference_mask_is_asymmetric():
    m = sampler.reference_mask(3, 2)
    assert m[:3].all() and m[3:, 3:].all() and not m[3:, :3].any()
    m = sampler.reference_mask(3, 2, see_ref=False)
    assert not m[:3, 3:].any() and m[:3, :3].all()


# -----------------------------------------------------------------------------------------------
# DramaBox duration estimate


DURATIONS = [  # prompt, the spoken text DramaBox extracts from it
    ('A woman says "Hello."', "Hello."),
    ("A man speaks: The weather today will be sunny and warm, with a light breeze.",
     "The weather today will be sunny and warm, with a light breeze."),
    ("Warm, conversational tone. 'Hello, welcome to the show.'", "Hello, welcome to the show."),
    ("He sighs. 'Go.' Then he laughs and pauses.", "He sighs. 'Go.' Then he laughs and pauses."),  # 'Go.' too short
    ("A calm narrator reading a story", "A calm narrator reading a story"),
    ("She gasps, \u201cIt's you! I can't believe it's really you after all these years.\u201d",
     "It's you! I can't believe it's really you after all these years."),
    ("Excited announcer. 'And the winner is...!' He gasps: 'We didn't see that coming, folks!'",
     "And the winner is...! We didn't see that coming, folks!"),
]


def _by_hand(spoken, prompt):
    """DramaBox's formula restated with str.count instead of regexes."""
    n = len(spoken)
    rate = 14 * (0.6 if n < 40 else 0.8 if n < 80 else 1.0)
    s = n / rate + 0.3 * sum(spoken.count(c) for c in ".!?")
    low = prompt.lower()
    s += 0.8 * low.count("sigh") + 0.5 * low.count("gasp") + 0.5 * low.count("pause") + 1.5 * low.count("laugh")
    base = max(3.0, round(s + 2, 1))
    return max(3.0, round(base * 1.1 + 0.8, 1))


@pytest.mark.parametrize("prompt,spoken", DURATIONS)
def test_duration_table(prompt, spoken):
    assert duration.spoken_text(prompt) == spoken
    assert duration.estimate_duration(prompt) == pytest.approx(_by_hand(spoken, prompt))


def test_duration_values():
    # worked numbers: 'Hello.' -> 6/8.4 + 0.3 = 1.01 -> base 3.0 -> 3.0*1.1 + 0.8 = 4.1
    assert duration.estimate_duration('A woman says "Hello."') == pytest.approx(4.1)
    # 61 chars at 11.2/s = 5.446 + 0.3 = 5.746 -> +2 = 7.7 -> 7.7*1.1+0.8 = 9.27 -> 9.3
    assert duration.estimate_duration("A man: " + "x" * 60 + ".") == pytest.approx(9.3)
    # a sigh and a laugh add 2.3 s of cues: 'Hi.' 3/8.4+0.3+2.3 = 2.957 -> 5.0 -> 6.3
    assert duration.estimate_duration('He sighs, laughs: "Hi."') == pytest.approx(6.3)
    assert duration.n_latent_tokens(4.1) == 102  # round(25 d)


def _adaln_and_speaker(model, seed=0):
    """The real SpeakerAdaLNZero (heads randomised: zero heads would make it a no-op) on the real
    weight-free `mel_stats` speaker extractor."""
    from adaln import SpeakerAdaLNZero
    from speaker import build_speaker_extractors

    speaker = build_speaker_extractors(["mel_stats"], {}, "cpu")
    torch.manual_seed(seed)
    adaln = SpeakerAdaLNZero(speaker.dim, model.cfg.num_layers, model.cfg.dim, rows=model.cfg.ada_rows, hidden=16)
    with torch.no_grad():
        for p in adaln.parameters():
            p.normal_(0, 0.05)
    return adaln.eval(), speaker


def test_adaln_and_both_modes_use_the_speaker():
    model = _tiny_dit(4)
    adaln, speaker = _adaln_and_speaker(model)
    g = torch.Generator().manual_seed(6)
    ref_a, ref_b = 0.1 * torch.randn(2, 2, 16000 * 2, generator=g)
    ref_b = ref_b * torch.linspace(0, 1, ref_b.shape[-1])  # a different spectrum over time
    kw = dict(adaln=adaln, speaker=speaker, spk_cfg=2.0)
    a = _sample(model, ["x", "x"], [1, 1], ref_wavs=[ref_a, ref_b], ref_mode="adaln", **kw)
    assert not torch.allclose(a[0], a[1])  # same prompt and seed, different speakers
    both = _sample(model, ["x"], [1], ref_wavs=[ref_a], ref_mode="both", **kw)
    assert not torch.allclose(both[0], a[0])
    with pytest.raises(ValueError, match="adaln"):
        _sample(model, ["x"], [1], ref_wavs=[ref_a], ref_mode="adaln")


def test_cli_writes_wavs_and_sidecars(tmp_path):
    """sample.py end to end with the real codec / text / data modules at the micro size."""
    import soundfile as sf

    from model import save_dit

    model = _tiny_dit(5)
    save_dit(model, str(tmp_path / "dit.safetensors"))
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: micro\ncodec: mel\nmel_n_mels: 4\ntext_encoder: byte\nmax_text_len: 32\n"
                   "speaker_extractors: []\n")
    ref = tmp_path / "ref.wav"
    sf.write(ref, 0.1 * torch.randn(24000, generator=torch.Generator().manual_seed(0)).numpy(), 16000)
    base = ["--ckpt", str(tmp_path / "dit.safetensors"), "--config", str(cfg), "--steps", "2", "--duration", "0.4",
            "--device", "cpu", "--prompt", "A man says: 'hello there, how are you?'"]
    sample.main(base + ["--seeds", "1,2", "--out_dir", str(tmp_path / "out")])
    sample.main(base + ["--out", str(tmp_path / "tok.wav"), "--seeds", "3", "--ref", str(ref), "--ref_mode", "tokens",
                        "--cfg", "2.5", "--stg", "1.5", "--rescale", "0", "--stg_blocks", "0"])
    for path in (tmp_path / "out" / "000_seed1.wav", tmp_path / "out" / "000_seed2.wav", tmp_path / "tok.wav"):
        wav, rate = sf.read(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        assert rate == meta["output_rate"] == 16000 and abs(len(wav) / rate - 0.4) < 0.05
        for key in ("prompt", "seed", "steps", "cfg", "stg", "stg_blocks", "rescale", "spk_cfg", "ref_mode", "ckpt",
                    "duration", "spoken_text"):
            assert key in meta
    adaln, _ = _adaln_and_speaker(model)
    torch.save({"state": adaln.state_dict(), "config": {"model": "micro"}}, tmp_path / "adaln.pt")
    cfg_spk = tmp_path / "run_spk.yaml"
    cfg_spk.write_text(cfg.read_text().replace("speaker_extractors: []", "speaker_extractors: [mel_stats]"))
    spk = base[:3] + [str(cfg_spk)] + base[4:] + ["--ref", str(ref), "--adaln", str(tmp_path / "adaln.pt"),
                                                  "--spk_cfg", "2", "--seeds", "4"]
    sample.main(spk + ["--out", str(tmp_path / "spk.wav")])
    assert json.loads((tmp_path / "spk.json").read_text())["ref_mode"] == "adaln"
    with pytest.raises(ValueError, match="speaker features"):  # adaln made for other extractors
        sample.main(base + ["--ref", str(ref), "--adaln", str(tmp_path / "adaln.pt"), "--out", str(tmp_path / "y.wav")])
    meta = json.loads((tmp_path / "tok.json").read_text())
    assert meta["ref_mode"] == "tokens" and meta["ref"] == str(ref) and meta["stg_blocks"] == [0]
    assert json.loads((tmp_path / "out" / "000_seed1.json").read_text())["ref_mode"] == "none"

    import lora
    from safetensors.torch import save_file

    lora.inject_lora(model, ["audio_attn1"], rank=2, alpha=2)
    with torch.no_grad():
        for _, m in lora.lora_modules(model):
            m.lora_B.weight.normal_(0, 0.1)
    lora.save_lora(model, tmp_path / "lora.safetensors", base_model_id="micro")
    sample.main(base + ["--out", str(tmp_path / "lora.wav"), "--lora", str(tmp_path / "lora.safetensors")])
    sample.main(base + ["--out", str(tmp_path / "plain.wav")])  # same seed (42), no LoRA
    assert not np.allclose(sf.read(tmp_path / "lora.wav")[0], sf.read(tmp_path / "plain.wav")[0])
    save_file({"diffusion_model.transformer_blocks.7.audio_ff.net.2.lora_A.weight": torch.zeros(2, 4),
               "diffusion_model.transformer_blocks.7.audio_ff.net.2.lora_B.weight": torch.zeros(4, 2)},
              str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="match no layer"):
        sample.main(base + ["--out", str(tmp_path / "z.wav"), "--lora", str(tmp_path / "other.safetensors")])
    with pytest.raises(FileNotFoundError, match="--ckpt .*missing.safetensors"):
        sample.main(["--ckpt", str(tmp_path / "missing.safetensors"), "--prompt", "x", "--device", "cpu"])
    with pytest.raises(ValueError, match="--ckpt .*run.yaml"):
        sample.main(["--ckpt", str(cfg), "--prompt", "x", "--device", "cpu", "--out", str(tmp_path / "x.wav")])
    with pytest.raises(ValueError, match="silent"):
        sf.write(tmp_path / "quiet.wav", torch.zeros(32000).numpy(), 16000)
        sample.main(base + ["--out", str(tmp_path / "q.wav"), "--ref", str(tmp_path / "quiet.wav"),
                            "--ref_mode", "tokens"])
