"""voice_encoder.py against the reference: the resemblyzer package itself (its VoiceEncoder,
librosa mel features, webrtcvad silence trimming), on eSpeak NG speech, noise and tones.

The package and its dependencies come from requirements-dev.txt; this file imports them directly,
so a missing one fails the run instead of skipping it."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

with warnings.catch_warnings():  # resemblyzer imports a deprecated scipy path
    warnings.simplefilter("ignore", DeprecationWarning)
    import resemblyzer
    import resemblyzer.audio as rz_audio

import corpus
import voice_encoder as ve

SR = ve.SAMPLE_RATE
# (eSpeak voice, pitch, pitch range, words/min): four clearly different voices
VOICES = [("en-us+m1", 30, 40, 150), ("en+f2", 75, 70, 175), ("en-gb-scotland+m3", 60, 60, 195),
          ("en+Storm", 25, 30, 140)]
LINES = ["the quiet river waits near the old garden", "a bright lamp shines over the tall mountain",
         "every morning the happy child sings again", "the cold horse rests behind the dark window"]


def speak(k):
    """Speech of voice k at 16 kHz, peak 0.9 (as corpus.py makes its clips)."""
    engine = corpus.Espeak.get()
    wav = corpus.resample(engine.synth(LINES[k], *VOICES[k], seed=k), engine.rate, SR)
    return (0.9 * wav / np.abs(wav).max()).astype(np.float32)


def gaps(wav, level, seed):
    """The clip with 0.5 / 0.8 / 0.6 s of noise at `level` before, inside and after it."""
    rng = np.random.default_rng(seed)
    noise = lambda s: (level * rng.standard_normal(int(s * SR))).astype(np.float32)  # noqa: E731
    half = len(wav) // 2
    return np.concatenate([noise(0.5), wav[:half], noise(0.8), wav[half:], noise(0.6)])


@pytest.fixture(scope="module")
def speech():
    return [speak(k) for k in range(len(VOICES))]


@pytest.fixture(scope="module")
def others():
    """Noise, tones, a chirp, a very short and a long clip, a loud and a quiet one."""
    rng = np.random.default_rng(0)
    t = np.arange(int(2.5 * SR)) / SR
    clips = {"white noise": 0.1 * rng.standard_normal(2 * SR),
             "tone 220 Hz": 0.5 * np.sin(2 * np.pi * 220 * t),
             "chirp": 0.3 * np.sin(2 * np.pi * (100 + 800 * t) * t),
             "0.3 s noise": 0.2 * rng.standard_normal(int(0.3 * SR)),
             "6 s tones": np.sin(2 * np.pi * np.outer(np.arange(int(6 * SR)) / SR, [150, 450, 900])).sum(1) / 3,
             "quiet tone": 1e-3 * np.sin(2 * np.pi * 330 * t)}
    return {k: v.astype(np.float32) for k, v in clips.items()}


@pytest.fixture(scope="module")
def models():
    return ve.load_encoder(), resemblyzer.VoiceEncoder("cpu", verbose=False)


def package_embed(ref, wav, trim):
    """The package's embedding of a 16 kHz clip: preprocess_wav (volume + webrtcvad) or volume only."""
    wav = rz_audio.preprocess_wav(wav) if trim else rz_audio.normalize_volume(wav, -30, increase_only=True)
    return ref.embed_utterance(wav)


def test_weights_load_without_the_package_imported():
    """load_encoder reads pretrained.pt from the wheel without importing resemblyzer or librosa."""
    code = ("import sys, voice_encoder as ve; enc = ve.load_encoder(); "
            "assert sum(p.numel() for p in enc.parameters()) == 1_423_616; "
            "bad = [m for m in ('resemblyzer', 'librosa', 'webrtcvad') if m in sys.modules]; "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ve.__file__.rsplit("/", 1)[0], capture_output=True,
                          text=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_mel_frames_equal_librosa(speech, others):
    for wav in [speech[0], others["chirp"], others["0.3 s noise"]]:
        want = rz_audio.wav_to_mel_spectrogram(wav)  # (T, 40) via librosa
        got = ve.mel_frames(torch.from_numpy(wav)).numpy()
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * want.max())


def test_partial_windows_equal_package():
    for n in [0, 1, 159, 160, 25599, 25600, 25601, *range(1000, 130000, 97)]:  # every coverage case
        _, mel_slices = resemblyzer.VoiceEncoder.compute_partial_slices(n, rate=1.3, min_coverage=0.75)
        assert ve.partial_starts(n) == [s.start for s in mel_slices], n


def test_embeddings_equal_package_without_trimming(speech, others, models):
    """The network, features, volume normalisation, partials and averaging: equal to float32
    rounding on speech, noise, tones, short / long / quiet clips."""
    enc, ref = models
    clips = speech + list(others.values())
    got = ve.embed(enc, [torch.from_numpy(w) for w in clips], trim=False).numpy()
    want = np.stack([package_embed(ref, w, trim=False) for w in clips])
    assert np.abs(got - want).max() <= 1e-5
    assert (got * want).sum(1).min() >= 0.99999


def test_batched_equals_one_by_one(speech, others, models):
    enc, _ = models
    clips = [torch.from_numpy(w) for w in speech[:2] + [others["6 s tones"]]]
    together = ve.embed(enc, clips, batch_size=3)
    alone = torch.cat([ve.embed(enc, [c]) for c in clips])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=0)


class FlagsVad:
    """Stands in for webrtcvad.Vad: answers the package's per-window questions with given flags."""

    def __init__(self, flags):
        self.flags = iter(flags)

    def __call__(self, mode):
        return self

    def is_speech(self, pcm, sample_rate):
        return bool(next(self.flags))


def test_trimming_equals_package_for_the_same_flags(speech, monkeypatch):
    """Smoothing and widening of the speech flags: the same samples kept as the package keeps."""
    for k, wav in enumerate([gaps(speech[0], 1e-3, 0), gaps(speech[1], 0.0, 1), speech[2]]):
        wav = ve.normalize_volume(torch.from_numpy(wav))
        cut = wav[: len(wav) // ve.VAD_WINDOW * ve.VAD_WINDOW]
        rng = np.random.default_rng(k)
        for flags in [ve.speech_windows(cut), rng.random(len(cut) // ve.VAD_WINDOW) < 0.5]:
            monkeypatch.setattr(rz_audio.webrtcvad, "Vad", FlagsVad(flags))
            want = rz_audio.trim_long_silences(wav.numpy())
            np.testing.assert_array_equal(ve.trim_silences(wav, flags).numpy(), want)


def test_energy_trimming_close_to_webrtcvad(speech, models):
    """Our energy decision in place of webrtcvad's: on speech as it is, embeddings equal the
    package's; with gaps of silence or noise they stay close, much closer than keeping the gaps."""
    enc, ref = models
    plain = [torch.from_numpy(w) for w in speech]
    want = np.stack([package_embed(ref, w.numpy(), trim=True) for w in plain])
    assert (ve.embed(enc, plain).numpy() * want).sum(1).min() >= 0.995
    for level in (1e-4, 3e-3):
        clips = [gaps(w, level, k) for k, w in enumerate(speech)]
        want = np.stack([package_embed(ref, w, trim=True) for w in clips])
        ours = (ve.embed(enc, [torch.from_numpy(w) for w in clips]).numpy() * want).sum(1)
        kept = (ve.embed(enc, [torch.from_numpy(w) for w in clips], trim=False).numpy() * want).sum(1)
        assert ours.min() >= 0.995, (level, ours)  # measured: >= 0.9985
        assert 1 - ours.mean() < (1 - kept.mean()) / 5, (level, ours, kept)  # keeping the gaps: 0.95-0.98


def test_bad_clips_are_named():
    enc = ve.load_encoder()
    for wav, why in [(torch.zeros(SR), "silent"), (torch.full((SR,), float("nan")), "NaN"),
                     (torch.ones(100), "shorter"), (torch.zeros(2, SR), "mono")]:
        with pytest.raises(ValueError, match=why) as err:
            ve.embed(enc, [torch.ones(SR) * 0.1, wav], names=["a.wav", "bad.wav"])
        assert str(err.value).startswith("bad.wav: ")


# -----------------------------------------------------------------------------------------------
# centroids and identification (no package needed: compared with the definitions written out)


def test_centroids_and_identify_against_numpy():
    rng = np.random.default_rng(0)
    names = ["a", "b", "c"]
    centres = rng.standard_normal((3, 16))
    speakers = [names[i % 3] for i in range(30)]
    emb = centres[[i % 3 for i in range(30)]] + 1.2 * rng.standard_normal((30, 16))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    cents = ve.centroids_from_clips(torch.from_numpy(emb).float(), speakers)
    assert sorted(cents) == names
    for k, s in enumerate(names):
        mean = emb[k::3].mean(0)
        np.testing.assert_allclose(cents[s].numpy(), mean / np.linalg.norm(mean), atol=1e-6)
    # a few clips of "a" and "c" only, scored against all three centroids
    test = emb[[0, 3, 2, 5, 8]]
    labels = ["a", "a", "c", "c", "c"]
    rep = ve.identify(torch.from_numpy(test).float(), labels, cents)
    C = np.stack([cents[s].numpy() for s in names])
    sims = test @ C.T
    own = np.array([names.index(s) for s in labels])
    correct = sims.argmax(1) == own
    margin = sims[np.arange(5), own] - (sims.sum(1) - sims[np.arange(5), own]) / 2
    assert rep["n"] == 5 and rep["chance"] == pytest.approx(1 / 3)
    assert rep["accuracy"] == pytest.approx(correct.mean()) and rep["margin"] == pytest.approx(margin.mean(), abs=1e-6)
    assert set(rep["per_speaker"]) == {"a", "c"}
    assert rep["per_speaker"]["c"]["accuracy"] == pytest.approx(correct[2:].mean())
    assert rep["per_speaker"]["a"]["margin"] == pytest.approx(margin[:2].mean(), abs=1e-6)
    with pytest.raises(ValueError, match="no centroid"):
        ve.identify(torch.from_numpy(test).float(), ["a", "a", "c", "c", "z"], cents)


def test_identifies_espeak_voices(speech, models):
    """The point of the yardstick: other utterances of the same eSpeak voices are recognised."""
    enc, _ = models
    cents = ve.centroids_from_clips(ve.embed(enc, [torch.from_numpy(w) for w in speech]), list("abcd"))
    engine = corpus.Espeak.get()
    new = []
    for k, voice in enumerate(VOICES):
        wav = corpus.resample(engine.synth(LINES[(k + 1) % 4], *voice, seed=10 + k), engine.rate, SR)
        new.append(torch.from_numpy(wav.astype(np.float32)))
    rep = ve.identify(ve.embed(enc, new), list("abcd"), cents)
    assert rep["accuracy"] == 1.0 and rep["margin"] > 0.1, rep
