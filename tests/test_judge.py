"""judge.py: trained on a few real clips per speaker, the judge recognises held-out real clips
far above chance (also after a mel -> Griffin-Lim round trip), and falls to chance when the labels
are shuffled or the clips are noise."""

import json

import numpy as np
import pytest
import torch

import corpus
import files
import judge


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with judge.one_thread():  # tiny tensors: see judge.one_thread
        yield


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """8 voices: 4 judge clips each to train on, 3 held-out val clips each to test on."""
    out = tmp_path_factory.mktemp("corpus")
    info = corpus.build_corpus(out, speakers=8, utts_per_speaker=10, seed=0, val_frac=0.3,
                               judge_frac=0.4, verbose=False)
    return judge.load_split(info["manifests"]["judge"]), judge.load_split(info["manifests"]["val"])


@pytest.fixture(scope="module")
def trained(clips):
    (wavs, speakers), _ = clips
    return judge.train_judge(wavs, speakers, seed=0)


def test_recognises_held_out_real_clips(clips, trained):
    (train_wavs, _), (wavs, speakers) = clips
    assert len(train_wavs) == 32 and len(wavs) == 24
    report = judge.judge_report(trained, wavs, speakers)
    assert report["chance"] == 1 / 8 and report["n"] == 24
    assert report["accuracy"] >= 0.9  # >= 7x chance
    assert report["margin"] > 0.3
    assert set(report["per_speaker"]) == set(trained.speakers)
    assert all(r["n"] == 3 and r["margin"] > 0 for r in report["per_speaker"].values())


def test_griffin_lim_ceiling(clips, trained):
    """Real clips through the codec's mel and back by Griffin-Lim stay recognisable: the judge can
    score audio a mel codec generates."""
    _, (wavs, speakers) = clips
    rebuilt = [judge.mel_griffin_lim(w, n_iter=16) for w in wavs]
    assert all(r.shape == w.shape for r, w in zip(rebuilt, wavs))
    report = judge.judge_report(trained, rebuilt, speakers)
    assert report["accuracy"] >= 0.75 and report["margin"] > 0.2


def test_robust_to_generator_like_degradation(clips, trained):
    """Smeared, noisy mels through Griffin-Lim, plus white noise at 20 dB SNR: still the voice."""
    _, (wavs, speakers) = clips
    gen = torch.Generator().manual_seed(0)
    degraded = []
    for i, w in enumerate(wavs):
        y = judge.mel_griffin_lim(w, n_iter=16, blur_t=5, log_noise=0.5, seed=i)
        degraded.append(y + 0.1 * y.pow(2).mean().sqrt() * torch.randn(y.shape, generator=gen))
    assert judge.judge_report(trained, degraded, speakers)["accuracy"] >= 0.75


def test_shuffled_labels_sit_at_chance(clips):
    (wavs, speakers), (test_wavs, test_speakers) = clips
    shuffled = list(np.random.default_rng(0).permutation(speakers))
    report = judge.judge_report(judge.train_judge(wavs, shuffled, seed=0), test_wavs, test_speakers)
    assert report["accuracy"] <= 0.35  # chance 0.125; 24 test clips


def test_noise_sits_at_chance(clips, trained):
    _, (_, speakers) = clips
    gen = torch.Generator().manual_seed(0)
    noise = [0.1 * torch.randn(32000, generator=gen) for _ in speakers]
    report = judge.judge_report(trained, noise, speakers)
    assert report["accuracy"] <= 0.35 and abs(report["margin"]) < 0.15


def test_predict_embed_and_sample_rates(clips, trained):
    _, (wavs, _) = clips
    proba = trained.predict_proba(wavs[:4])
    assert proba.shape == (4, 8)
    torch.testing.assert_close(proba.sum(-1), torch.ones(4))
    emb = trained.embed(wavs[:4])
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))
    # a clip at 22.05 kHz, stereo, is resampled and downmixed: same decision
    import torchaudio
    wav22 = torchaudio.functional.resample(wavs[0], 16000, 22050)
    stereo = torch.stack([wav22, wav22])
    assert trained.predict_proba([stereo], sample_rate=22050).argmax() == proba[0].argmax()


def test_save_load(clips, trained, tmp_path):
    _, (wavs, _) = clips
    judge.save_judge(trained, tmp_path / "j.safetensors")
    loaded = judge.load_judge(tmp_path / "j.safetensors")
    assert loaded.speakers == trained.speakers
    torch.testing.assert_close(loaded.predict_proba(wavs), trained.predict_proba(wavs))
    torch.testing.assert_close(loaded.centroids, trained.centroids)
    # the weights are plain safetensors, the settings JSON metadata: nothing is unpickled
    state = files.load_safetensors(tmp_path / "j.safetensors")
    meta = files.read_safetensors_metadata(tmp_path / "j.safetensors")
    features = {**json.loads(meta["features"]), "n_mels": 64}
    files.save_safetensors(state, tmp_path / "other.safetensors", {**meta, "features": features})
    with pytest.raises(ValueError, match="other.safetensors: judge features"):
        judge.load_judge(tmp_path / "other.safetensors")
    files.save_safetensors(state, tmp_path / "dit.safetensors", {"config": "{}"})  # any other safetensors file
    with pytest.raises(ValueError, match="dit.safetensors: not a judge written by judge.py"):
        judge.load_judge(tmp_path / "dit.safetensors")


def test_bad_input(clips, trained):
    (wavs, speakers), _ = clips
    with pytest.raises(ValueError, match="clips but"):
        judge.train_judge(wavs, speakers[:-1])
    with pytest.raises(ValueError, match="at least 2 speakers"):
        judge.train_judge(wavs[:2], ["a", "a"])
    with pytest.raises(ValueError, match="not among the judge's"):
        judge.judge_report(trained, wavs[:1], ["nobody"])
    with pytest.raises(ValueError, match="mono clip"):
        trained.predict_proba([torch.zeros(2, 2, 100)])
    with pytest.raises(ValueError, match="NaN/Inf"):
        judge.judge_report(trained, [torch.full((16000,), float("nan"))], speakers[:1])
    assert trained.predict_proba([torch.randn(100)]).shape == (1, 8)  # very short clips are padded
