"""Stage 2 on the microscopic corpus: the ReFL speaker loss, back-propagated through the mel codec's
Griffin-Lim decode into SpeakerAdaLNZero, goes down; the frozen DiT gets no gradient."""

import contextlib

import torch

import data
import train
from config import load_config
from conftest import MICRO

STEPS = 12


def _stage2_parts(micro_corpus, extra=()):
    work, data_args = micro_corpus
    cfg = load_config([*data_args, *MICRO, "--stage=adaln", "--aux_losses=[speaker]", "--aux_ratios={speaker: 1.0}",
                       "--aux_sigma_max=1.0", "--aux_clips=2", "--speaker_dropout=0", "--dtype=fp32", *extra])
    train_set = data.load_cached(cfg, cfg.manifest, split="train")
    batch = data.collate(train_set, [0, 1], cfg, epoch=0, step=0)
    parts = train.build(cfg, torch.device("cpu"), batch)
    # a fresh DiT is adaLN-zero (v ≡ 0, nothing for the AdaLN to steer): give the frozen backbone
    # random non-zero modulation and output weights, as a trained checkpoint has
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in parts["dit"].named_parameters():
            if p.abs().max() == 0:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return cfg, parts, batch


def test_refl_speaker_loss_goes_down_and_only_adaln_learns(micro_corpus):
    cfg, parts, batch = _stage2_parts(micro_corpus)
    batch["speaker_present"][:] = True
    aux = train.AuxLosses(cfg, torch.device("cpu"))
    params = [p for _, p in parts["trainable"]]
    assert all(not p.requires_grad for p in parts["dit"].parameters())
    opt = torch.optim.Adam(params, lr=5e-3)
    history = []
    for _ in range(STEPS):
        gen = torch.Generator().manual_seed(1)  # the same σ and noise every step: a clean descent
        x_t, sigma, timesteps, noise = train.noised_inputs(batch, gen, cfg)
        sigma = torch.full_like(sigma, 0.3)
        timesteps = torch.where(batch["ref_mask"], torch.zeros_like(timesteps), torch.full_like(timesteps, 0.3))
        x_t = (1 - timesteps[..., None]) * batch["x0"] + timesteps[..., None] * noise
        v = train.predict(parts, batch, x_t, sigma, timesteps, contextlib.nullcontext())
        values = aux.losses(batch, x_t, v, sigma)
        assert set(values) == {"speaker"}
        opt.zero_grad()
        values["speaker"].backward()
        assert all(p.grad is None for p in parts["dit"].parameters())
        opt.step()
        history.append(values["speaker"].item())
    assert history[0] > 0
    # mel_stats cosines sit near 1 (the mean log level dominates), so the loss is small: a steady
    # ~10% drop at this size; a broken gradient path leaves it flat (Adam on zeros) or drifting
    assert sum(history[-4:]) / 4 < 0.93 * history[0], history


def test_validation_reports_speaker_similarity(micro_corpus):
    cfg, parts, _ = _stage2_parts(micro_corpus)
    aux = train.AuxLosses(cfg, torch.device("cpu"))
    val_set = data.load_cached(cfg, cfg.val_manifest, split="val")
    out = train.validate(cfg, parts, val_set, torch.device("cpu"), contextlib.nullcontext(), aux)
    assert set(out) == {"val_loss", "val_spk_sim"}
    assert -1.0 <= out["val_spk_sim"] <= 1.0 and out["val_loss"] > 0
