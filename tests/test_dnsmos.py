"""dnsmos.py against the reference: onnxruntime running the speechmos ONNX file, driven by
speechmos's own clip loop (`speechmos.dnsmos.DNSMOS.__call__`: repeat-padding, 9.01 s windows,
polynomial fits). Audio: tests/data/speech_16k.wav (eSpeak NG speech, see tests/data/README.md)."""

import importlib
import sys
import types
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import soundfile as sf
import torch

import dnsmos

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def model():
    return dnsmos.DNSMOS()


@pytest.fixture(scope="module")
def speech():
    wav, sr = sf.read(DATA / "speech_16k.wav", dtype="float32")
    assert sr == 16000 and wav.ndim == 1
    return wav


def noisy(wav, snr_db, seed=0):
    noise = np.random.default_rng(seed).standard_normal(len(wav)).astype(np.float32)
    noise *= np.sqrt((wav ** 2).mean() / (noise ** 2).mean() / 10 ** (snr_db / 10))
    return np.clip(wav + noise, -1, 1).astype(np.float32)


@pytest.fixture(scope="module")
def speechmos_scorer():
    """speechmos's DNSMOS class with its P.808 branch stubbed out: librosa (only used for the P.808
    mel features) and requests (an unused import) are not dependencies of this project."""
    saved = {k: sys.modules.get(k) for k in ("librosa", "requests", "speechmos.dnsmos")}
    sys.modules["librosa"] = types.ModuleType("librosa")
    if importlib.util.find_spec("requests") is None:
        sys.modules["requests"] = types.SimpleNamespace(session=None)
    sys.modules.pop("speechmos.dnsmos", None)
    try:
        ref = importlib.import_module("speechmos.dnsmos")
        primary = dnsmos.speechmos_model_path()
        scorer = ref.DNSMOS(primary, str(Path(primary).with_name("model_v8.onnx")))
    finally:  # leave no module imported against the stubs behind
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        if saved["speechmos.dnsmos"] is None:
            delattr(sys.modules["speechmos"], "dnsmos")
        else:
            sys.modules["speechmos"].dnsmos = saved["speechmos.dnsmos"]
    scorer.audio_melspec = lambda audio: np.zeros((1, 1), np.float32)
    scorer.p808_onnx_sess = types.SimpleNamespace(run=lambda *a: [np.zeros((1, 1), np.float32)])
    return scorer


@pytest.mark.parametrize("personalized", [False, True])
def test_port_matches_onnxruntime_single_window(model, speech, personalized):
    """Raw network outputs on one 9.01 s window equal onnxruntime's (DNSMOS and pDNSMOS files)."""
    net = dnsmos.DNSMOS(personalized=True) if personalized else model
    window = np.tile(speech, 2)[None, :dnsmos.WINDOW]
    sess = ort.InferenceSession(dnsmos.speechmos_model_path(personalized), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"input_1": window})[0]
    with torch.no_grad():
        got = net.raw_scores(torch.from_numpy(window)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_clip_scores_equal_speechmos_and_clean_beats_noisy(model, speech, speechmos_scorer):
    """A batch of (clean, 5 dB noisy) speech: mapped SIG/BAK/OVR equal speechmos within 1e-4, and
    clean speech scores higher than the same speech with noise."""
    batch = np.stack([speech, noisy(speech, 5.0)])
    with torch.no_grad():
        got = model(torch.from_numpy(batch))
    for b in range(2):
        want = speechmos_scorer(batch[b], 16000, False)
        for ours, theirs in (("sig", "sig_mos"), ("bak", "bak_mos"), ("ovr", "ovrl_mos")):
            assert abs(got[ours][b].item() - want[theirs]) < 1e-4, (b, ours, got[ours][b].item(), want[theirs])
    assert got["ovr"][0] > got["ovr"][1] + 0.3
    assert got["bak"][0] > got["bak"][1] + 0.3


def test_window_starts_follow_speechmos():
    """Window starts equal speechmos's loop (including the windows its float rounding drops)."""
    for seconds in (9.01, 10.99, 11.0, 17.5, 30.0, 130.0):
        n = int(seconds * 16000)
        want = []
        for idx in range(int(np.floor(n / 16000) - 9.01) + 1):
            start, end = int(idx * 16000), int((idx + 9.01) * 16000)
            if end - start >= dnsmos.WINDOW:
                want.append(start)
        assert dnsmos.window_starts(n) == want
    assert 7 * 16000 not in dnsmos.window_starts(30 * 16000)  # speechmos skips it


def test_gradient_reaches_waveform(model, speech):
    """d OVR / d waveform is finite and non-zero; the scorer's own weights get no gradient. The
    second clip is digital silence: the power clamp keeps its gradient finite where the graph's
    sqrt would not."""
    wav = torch.from_numpy(np.stack([speech, np.zeros_like(speech)])).requires_grad_(True)
    model(wav)["ovr"].sum().backward()
    assert torch.isfinite(wav.grad).all() and wav.grad[0].abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_bad_file_names_the_key(model, tmp_path):
    with pytest.raises(ValueError, match="not an ONNX model"):
        (tmp_path / "x.onnx").write_bytes(b"")
        dnsmos.DNSMOS(str(tmp_path / "x.onnx"))
    with pytest.raises(KeyError, match="time2freq/stft-real"):
        dnsmos.DNSMOS(str(Path(dnsmos.speechmos_model_path()).with_name("model_v8.onnx")))
    with pytest.raises(ValueError, match="mono"):
        model(torch.zeros(1, 2, 100))
