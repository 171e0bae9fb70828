"""Stage 2 on the microscopic corpus: the ReFL speaker loss, back-propagated through the mel codec's
Griffin-Lim decode into SpeakerAdaLNZero, goes down; the frozen DiT gets no gradient."""

import contextlib

import torch

import data
import losses
import train
from config import load_config
from conftest import MICRO

STEPS = 8


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
    # 2 Griffin-Lim iterations: 32 (momentum 0.99) make the loss rough below a 0.1 step (finite
    # differences there disagree with the gradient 100-fold), 2 keep the whole chain and a smooth loss
    cfg, parts, batch = _stage2_parts(micro_corpus, ["--griffin_lim_iters=2"])
    batch["speaker_present"][:] = True
    aux = train.AuxLosses(cfg, torch.device("cpu"))
    params = [p for _, p in parts["trainable"]]
    assert all(not p.requires_grad for p in parts["dit"].parameters())
    gen = torch.Generator().manual_seed(1)
    _, _, timesteps, noise = train.noised_inputs(batch, gen, cfg)
    sigma = torch.full((batch["x0"].shape[0],), 0.3)  # the same σ and noise every step: a clean descent
    timesteps = torch.where(batch["ref_mask"], torch.zeros_like(timesteps), torch.full_like(timesteps, 0.3))
    x_t = (1 - timesteps[..., None]) * batch["x0"] + timesteps[..., None] * noise

    def speaker_loss():
        v = train.predict(parts, batch, x_t, sigma, timesteps, contextlib.nullcontext())
        values = aux.losses(batch, x_t, v, sigma)
        assert set(values) == {"speaker"}
        return values["speaker"]

    def move(direction, step):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p += step * d

    # the gradient that flows speaker embedding -> Griffin-Lim decode -> frozen DiT ->
    # SpeakerAdaLNZero equals the loss's slope: the central difference along u = g/|g| is g·u = |g|
    # (a mis-scaled, sign-flipped or empty gradient fails; they agree to 1.5% here)
    loss = speaker_loss()
    loss.backward()
    assert all(p.grad is None for p in parts["dit"].parameters())
    grads = [p.grad.clone() for p in params]
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    u, eps = [g / norm for g in grads], 1e-3
    with torch.no_grad():
        move(u, eps)
        up = speaker_loss().item()
        move(u, -2 * eps)
        down = speaker_loss().item()
        move(u, eps)
    assert abs((up - down) / (2 * eps) - norm.item()) < 0.05 * norm.item(), ((up - down) / (2 * eps), norm.item())

    # and descent with backtracking along it lowers the loss at every step
    history, step = [loss.item()], 0.05
    for _ in range(STEPS):
        for p in params:
            p.grad = None
        speaker_loss().backward()
        grads = [p.grad.clone() for p in params]
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        for _ in range(8):
            move(grads, -step / norm)
            with torch.no_grad():
                now = speaker_loss().item()
            if now < history[-1]:
                step *= 2  # accepted: try a longer step next time
                break
            move(grads, step / norm)
            step /= 2
        history.append(now)
    assert all(b < a for a, b in zip(history, history[1:])), history


def test_validation_reports_speaker_similarity(micro_corpus, monkeypatch):
    """With an oracle velocity (x0̂ = x0 exactly) validation's flow loss is 0 and its speaker
    similarity is the cosine between each clean target's features and its own reference's."""
    cfg, parts, _ = _stage2_parts(micro_corpus)
    aux = train.AuxLosses(cfg, torch.device("cpu"))
    val_set = data.load_cached(cfg, cfg.val_manifest, split="val")
    out = train.validate(cfg, parts, val_set, torch.device("cpu"), contextlib.nullcontext(), aux)
    assert set(out) == {"val_loss", "val_text_gain", "val_spk_sim"} and out["val_loss"] > 0

    def oracle(parts, batch, x_t, sigma, timesteps, autocast, keep_speaker=None):
        return (x_t - batch["x0"]) / sigma[:, None, None]  # ε - x0 on target tokens, 0 on the reference

    monkeypatch.setattr(train, "predict", oracle)
    out = train.validate(cfg, parts, val_set, torch.device("cpu"), contextlib.nullcontext(), aux)
    own = []
    for batch in data.iterate_batches(val_set, cfg.micro_batch):
        for i in batch["speaker_present"].nonzero().flatten().tolist():
            clip = aux.codec.decode_16k(batch["x0"][i][batch["loss_mask"][i]][None]).mean(1)[0]
            emb = aux.speaker.embed([clip])[0]
            own.append(torch.nn.functional.cosine_similarity(emb, batch["speaker"][i].float(), dim=0).item())
    assert out["val_loss"] < 1e-10
    # another item's reference differs by 1e-3 to 1e-2 in cosine here: a mis-paired reference fails
    assert len(own) > 1 and abs(out["val_spk_sim"] - sum(own) / len(own)) < 1e-5, (out, own)


def test_validation_text_gain_measures_what_the_words_are_worth(micro_corpus, monkeypatch):
    """val_text_gain = flow loss with the batch neighbour's prompt - with the item's own: exactly 0
    for a model that ignores the words, and for one whose prediction is off by (s(prompt) - s(own
    prompt)) per item, s a signature of the text features, the mean of that offset squared."""
    cfg, parts, _ = _stage2_parts(micro_corpus)
    val_set = data.load_cached(cfg, cfg.val_manifest, split="val")
    batches = list(data.iterate_batches(val_set, cfg.micro_batch))
    assert sum(b["x0"].shape[0] for b in batches) > len(batches), "need batches of two or more"
    signature = lambda text: text.float().flatten(1).sum(1) * 0.1  # (B,)
    # the item's own prompt, found by its clean target (a model that "knows" which words go with x0)
    own = {float(b["x0"][i].sum()): float(signature(b["text"])[i]) for b in batches for i in range(len(b["x0"]))}

    def deaf(parts, batch, x_t, sigma, timesteps, autocast, keep_speaker=None):
        return (x_t - batch["x0"]) / sigma[:, None, None]

    def reading(parts, batch, x_t, sigma, timesteps, autocast, keep_speaker=None):
        off = signature(batch["text"]) - torch.tensor([own[float(x.sum())] for x in batch["x0"]])
        return deaf(parts, batch, x_t, sigma, timesteps, autocast) + off[:, None, None]

    monkeypatch.setattr(train, "predict", deaf)
    out = train.validate(cfg, parts, val_set, torch.device("cpu"), contextlib.nullcontext())
    assert out["val_loss"] < 1e-10 and out["val_text_gain"] == 0.0, out
    monkeypatch.setattr(train, "predict", reading)
    out = train.validate(cfg, parts, val_set, torch.device("cpu"), contextlib.nullcontext())
    offsets = [signature(b["text"].roll(1, 0)) - signature(b["text"]) for b in batches if len(b["x0"]) > 1]
    want = torch.cat(offsets).square().mean().item()
    assert want > 0.01 and abs(out["val_text_gain"] - want) < 1e-4 * want, (out, want)


def test_refl_decodes_the_middle_crop(micro_corpus):
    """aux_crop_seconds: only the middle of a long clip is decoded and scored."""
    cfg, parts, batch = _stage2_parts(micro_corpus, ["--aux_crop_seconds=0.2"])
    aux = train.AuxLosses(cfg, torch.device("cpu"))
    x0 = torch.randn(1, 40, batch["x0"].shape[-1])
    crop_batch = {"loss_mask": torch.ones(1, 40, dtype=torch.bool)}
    (clip,) = aux.decode16(x0, crop_batch, [0])
    want = aux.codec.decode_16k(x0[:, 17:22]).mean(1)[0]  # 0.2 s = 5 tokens, centred in 40
    assert torch.equal(clip, want)
    whole = train.AuxLosses(load_config([*micro_corpus[1], *MICRO, "--aux_crop_seconds=0"]), torch.device("cpu"))
    assert whole.decode16(x0, crop_batch, [0])[0].shape[0] > clip.shape[0] * 7


def test_noised_inputs_draw_sigma_with_the_configs_mu_offset(micro_corpus):
    # configs/tiny_adaln.yaml trains stage 2 at sigma_mu_offset 1: the key must reach the σ draw
    work, data_args = micro_corpus
    cfg = load_config([*data_args, *MICRO, "--stage=adaln", "--sigma_mu_offset=1.5"])
    batch = data.collate(data.load_cached(cfg, cfg.manifest, split="train"), [0, 1], cfg, epoch=0, step=0)
    n_tokens = int(batch["loss_mask"].sum(1).float().mean().item())
    B = batch["x0"].shape[0]
    _, sigma, timesteps, _ = train.noised_inputs(batch, torch.Generator().manual_seed(7), cfg)
    want = losses.sample_sigma(B, n_tokens, generator=torch.Generator().manual_seed(7), mu_offset=1.5)
    plain = losses.sample_sigma(B, n_tokens, generator=torch.Generator().manual_seed(7))
    assert torch.equal(sigma, want) and not torch.equal(sigma, plain)
    assert torch.equal(timesteps[~batch["ref_mask"]], sigma[:, None].expand_as(timesteps)[~batch["ref_mask"]])
