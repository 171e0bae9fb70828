"""Speaker references at sampling time: a clip checked and normalised as training saw its
references (at most 10 s, peak at -4 dBFS), with errors that name the file, and the per-item
conditioning sample() builds from them (codec latents for reference tokens, SpeakerAdaLNZero
deltas from speaker features).
"""

import os

import torch

import audio

REF_SECONDS = 10.0  # DramaBox encodes ~10 s of the reference
MIN_REF_SECONDS = 1.0  # LAIONBox recommends 3-15 s; under 1 s there is no voice to copy
SILENCE_RMS = 1e-4


def prepare_reference(wav, sample_rate, name="reference"):
    """Check and normalise a reference waveform (C, N): crop to REF_SECONDS, peak to -4 dBFS.

    Raises ValueError naming `name` when it is too short or silent.
    """
    wav = torch.as_tensor(wav, dtype=torch.float32)
    if wav.ndim == 1:
        wav = wav[None]
    seconds = wav.shape[-1] / sample_rate
    if seconds < MIN_REF_SECONDS:
        raise ValueError(f"{name}: reference audio is {seconds:.2f} s long, at least {MIN_REF_SECONDS} s "
                         f"is needed (3-15 s recommended)")
    if not torch.isfinite(wav).all():
        raise ValueError(f"{name}: reference audio contains NaN or Inf samples")
    wav = wav[..., : int(REF_SECONDS * sample_rate)]
    rms = wav.pow(2).mean().sqrt().item()
    if rms < SILENCE_RMS:
        raise ValueError(f"{name}: reference audio is silent (RMS {rms:.2e})")
    return wav * (audio.REF_PEAK / wav.abs().max())


def load_reference(path, sample_rate, channels):
    """Read a reference file with codec.load_audio, with errors that name the file."""
    from codec import load_audio

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--ref {path}: file not found")
    try:
        wav = load_audio(path, sample_rate, channels)
    except ValueError:  # codec.load_audio names the file and the problem
        raise
    except Exception as e:  # soundfile / resampling errors of other types
        raise ValueError(f"--ref {path}: cannot read audio ({type(e).__name__}: {e})") from e
    return prepare_reference(wav, sample_rate, name=path)


def check_reference(path):
    """Read a reference at its own rate and run prepare_reference's checks (before any model loads)."""
    import soundfile as sf

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--ref {path}: file not found")
    try:
        wav, rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises RuntimeError / LibsndfileError for broken files
        raise ValueError(f"--ref {path}: cannot read audio ({type(e).__name__}: {e})") from e
    prepare_reference(torch.from_numpy(wav.T), rate, name=path)


def reference_inputs(refs, ref_mode, codec, adaln, speaker, device):
    """Per item of `refs` (None / a path / a (C, N) tensor at codec.sample_rate): (reference latents
    (1, Tr, F) or None, SpeakerAdaLNZero deltas (1, blocks, rows*D) or None), as `ref_mode` asks
    (tokens: latents; adaln: deltas; both; none). Each distinct reference is read and encoded once."""
    use_tokens = ref_mode in ("tokens", "both")
    use_adaln = ref_mode in ("adaln", "both")
    channels = getattr(codec, "channels", 2)
    ref_lat, ref_deltas = [None] * len(refs), [None] * len(refs)
    cache = {}
    for i, r in enumerate(refs):
        if r is None or ref_mode == "none":
            continue
        key = r if isinstance(r, str) else id(r)
        if key not in cache:
            wav = load_reference(r, codec.sample_rate, channels) if isinstance(r, str) else \
                prepare_reference(r, codec.sample_rate, name=f"reference of item {i}")
            lat = codec.encode(wav[None].to(device)).float() if use_tokens else None  # (1, Tr, F)
            d = None
            if use_adaln:
                mono = wav.mean(0, keepdim=True)  # (1, N)
                wav16 = audio.resample(mono, codec.sample_rate, audio.SAMPLE_RATE).to(device)
                d = adaln(speaker(wav16).float())  # (1, blocks, rows*D)
            cache[key] = (lat, d)
        ref_lat[i], ref_deltas[i] = cache[key]
    return ref_lat, ref_deltas
