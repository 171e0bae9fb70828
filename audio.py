"""Audio at the repository's edges: the one rate speech is scored at, the one resampler, and a
generated clip written as a WAV with its JSON sidecar.

A component: imports nothing of the repository, so the evaluation tools (voice_encoder.py,
dnsmos.py, judge.py) take the rate from here without reaching into the training side.
"""

import json
import os

import soundfile as sf
import torch
import torchaudio.functional as AF

# The rate of every scorer and speaker extractor (WavLM-SV, DNSMOS, the GE2E voice encoder, the
# judge), of the corpus, and of the LTX audio VAE's mel front end (hop 160 -> 100 frames/s).
SAMPLE_RATE = 16000
# References are peak-normalised to -4 dBFS (as DramaBox does) before speaker features are taken,
# in the training cache and at sampling alike.
REF_PEAK = 10 ** (-4.0 / 20)


def resample(wav, orig_rate, new_rate):
    """torchaudio's band-limited sinc resampling along the last axis (differentiable); a no-op
    when the rates are equal."""
    return wav if orig_rate == new_rate else AF.resample(wav, orig_rate, new_rate)


def write_wav(path, wav, rate, meta):
    """A (C, N) float tensor to a WAV at `path`, and `meta` as JSON beside it (same name, .json):
    what made the clip, so a folder of samples explains itself. Returns the sidecar's path."""
    sf.write(path, wav.T.numpy(), rate)
    side = os.path.splitext(os.fspath(path))[0] + ".json"
    with open(side, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2, default=str)
    return side


def read_mono16k(path):
    """A file as a mono float32 tensor (N,) at 16 kHz (what every scorer reads)."""
    data, rate = sf.read(path, dtype="float32", always_2d=True)
    return resample(torch.from_numpy(data.mean(1)), rate, SAMPLE_RATE)
