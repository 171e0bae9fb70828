"""Speaker features of a reference recording: the input of SpeakerAdaLNZero (adaln.py).

A configured list of extractors (config `speaker_extractors`, weights from `speaker_paths`), each
mapping mono 16 kHz audio to a fixed-size vector; their concatenation, in list order, is the
feature vector, so the AdaLN input dim is the sum of their dims. LAIONBox v0.4 uses
wavlm_sv + orange_tbr + clap_how + clap_what = 512 + 128 + 768 + 768 = 2176 (its model card).

    wavlm_sv    transformers `WavLMForXVector` + its feature extractor from a local directory
                (microsoft/wavlm-base-plus-sv: 512-d); the x-vector, L2-normalised
    orange_tbr  plug point, 128-d (Orange/Speaker-wavLM-tbr)      } a local `torch.export` program
    clap_how    plug point, 768-d (LAIONBox CLAP "how it is said") } file (.pt2) mapping a waveform
    clap_what   plug point, 768-d (LAIONBox CLAP "what is said")   } (B, N) to (B, dim); L2-normalised
    mel_stats   mean and std over frames of the log-mel spectrogram; no weights, for small runs
                (default 64 mels -> 128-d)
    tiny_sv     a small speaker-verification network trained by train_sv.py on the run's own train
                split (metric learning: which voice is this?), weights = the safetensors file it
                writes; the stand-in for wavlm_sv where no pretrained model may be downloaded

The plug points exist because those checkpoints need their own (partly unpublished) code: export
the model with `torch.export.export(model, (wav,), dynamic_shapes=...)` (batch and sample dims
dynamic) and `torch.export.save`, then point `speaker_paths[name]` at the file.

Every extractor is a frozen nn.Module written in torch ops only, so the embedding is
differentiable with respect to the waveform: the stage-2 ReFL speaker loss back-propagates a
cosine through it into the generated audio (`embed(wav, differentiable=True)`).
"""

import hashlib
import itertools
import json
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import files
from audio import SAMPLE_RATE

# documented dims of the plug points (LAIONBox v0.4 card)
PLUG_DIMS = {"orange_tbr": 128, "clap_how": 768, "clap_what": 768}
KNOWN = ["wavlm_sv", *PLUG_DIMS, "mel_stats", "tiny_sv"]


def _hash_path(path):
    """sha256 of a file, or of every file under a directory (relative names and bytes, sorted)."""
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, f) for root, _, names in os.walk(path) for f in names)
    for file in files:
        h.update(os.path.relpath(file, path).encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def log_mel(wav, n_fft, hop, window, fbanks):
    """log(clamp(mel power of |STFT|, 1e-5)) of (B, N) audio: (B, frames, mels); centred, reflect-padded
    frames of len(window) samples; fbanks (n_fft/2+1, mels)."""
    spec = torch.stft(wav, n_fft, hop, window.numel(), window=window, center=True, pad_mode="reflect",
                      return_complex=True).abs()  # (B, F, frames)
    return torch.log((spec.transpose(1, 2) @ fbanks).clamp(min=1e-5))


class WeightsFile(nn.Module):
    """An extractor whose weights live at `self.path` (a file or directory): its fingerprint is
    `name:sha256 of the bytes`, hashed once per instance."""

    name, path, _fingerprint = "", "", None

    def fingerprint(self):
        if self._fingerprint is None:
            self._fingerprint = f"{self.name}:{_hash_path(self.path)}"
        return self._fingerprint


class MelStats(nn.Module):
    """Mean and std over time of the log-mel spectrogram: (B, N) -> (B, 2*n_mels).

    Defaults are the LTX audio codec's mel settings: n_fft 1024, hop 160, 64 Slaney
    mels, magnitude, log(clamp(x, 1e-5)).
    """

    def __init__(self, n_mels=64, n_fft=1024, hop=160):
        super().__init__()
        import torchaudio.functional as AF

        self.n_mels, self.n_fft, self.hop = n_mels, n_fft, hop
        self.dim = 2 * n_mels
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        fbanks = AF.melscale_fbanks(n_fft // 2 + 1, 0.0, SAMPLE_RATE / 2, n_mels, SAMPLE_RATE,
                                    norm="slaney", mel_scale="slaney")
        self.register_buffer("fbanks", fbanks, persistent=False)  # (n_fft/2+1, n_mels)

    def fingerprint(self):
        return f"mel_stats:n_mels={self.n_mels},n_fft={self.n_fft},hop={self.hop},sr={SAMPLE_RATE},slaney,log1e-5"

    def forward(self, wav):
        if wav.shape[-1] <= self.n_fft // 2:
            raise ValueError(f"mel_stats: clip of {wav.shape[-1]} samples is shorter than n_fft/2 = {self.n_fft // 2}")
        logmel = log_mel(wav, self.n_fft, self.hop, self.window, self.fbanks)  # (B, frames, n_mels)
        return torch.cat([logmel.mean(1), logmel.std(1, correction=0)], dim=-1)


class WavLMSV(WeightsFile):
    """WavLM x-vector (transformers `WavLMForXVector`) from a local directory: (B, N) -> (B, dim),
    L2-normalised as in the wavlm-base-plus-sv model card. The feature extractor's input
    normalisation (when its `do_normalize` is set) is redone in torch so gradients flow."""

    def __init__(self, path):
        super().__init__()
        from transformers import AutoFeatureExtractor, WavLMForXVector

        if not path or not os.path.isdir(path):
            raise FileNotFoundError(
                f"wavlm_sv: speaker_paths['wavlm_sv'] must be a local WavLMForXVector directory, got {path!r}")
        try:
            extractor = AutoFeatureExtractor.from_pretrained(path)
        except OSError as e:
            raise FileNotFoundError(
                f"wavlm_sv: {path} has no feature extractor (preprocessor_config.json): {e}") from None
        if extractor.sampling_rate != SAMPLE_RATE:
            raise ValueError(f"wavlm_sv: {path} expects {extractor.sampling_rate} Hz audio, we feed {SAMPLE_RATE} Hz")
        self.name, self.path = "wavlm_sv", path
        self.do_normalize = bool(extractor.do_normalize)
        self.model = WavLMForXVector.from_pretrained(path, dtype=torch.float32)
        self.dim = self.model.config.xvector_output_dim

    def forward(self, wav):
        if self.do_normalize:  # Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm, per clip
            wav = (wav - wav.mean(-1, keepdim=True)) / torch.sqrt(wav.var(-1, keepdim=True, correction=0) + 1e-7)
        return F.normalize(self.model(input_values=wav).embeddings, dim=-1)


class ExportedExtractor(WeightsFile):
    """A plug-point extractor: a `torch.export` program file mapping (B, N) -> (B, dim)."""

    def __init__(self, name, path):
        super().__init__()
        if not path:
            raise FileNotFoundError(
                f"{name}: no weights given; set speaker_paths['{name}'] to a local torch.export program "
                f"(.pt2) mapping a 16 kHz waveform (B, N) to a ({PLUG_DIMS[name]},) embedding per clip")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{name}: speaker_paths['{name}'] = {path} does not exist")
        try:
            self.program = torch.export.load(path).module()
        except Exception as e:
            raise ValueError(f"{name}: {path} is not a loadable torch.export program: {e}") from None
        self.name, self.path, self.dim = name, path, PLUG_DIMS[name]
        with torch.no_grad():
            out = self.program(torch.zeros(2, SAMPLE_RATE))
        if tuple(out.shape) != (2, self.dim):
            raise ValueError(f"{name}: {path} maps (2, {SAMPLE_RATE}) to {tuple(out.shape)}, expected (2, {self.dim})")

    def forward(self, wav):
        return F.normalize(self.program(wav), dim=-1)

    def train(self, mode=True):
        """No-op: an exported program has no train mode (its `train()` raises); it runs as exported."""
        return self


class TinySVNet(nn.Module):
    """A small x-vector network: 16 kHz waveform (B, N) -> L2-normalised voice embedding (B, dim).

    log-mel (25 ms windows, 10 ms hop) -> four 1-D convolutions over time (dilated, ReLU +
    BatchNorm: the TDNN of x-vectors, narrow) -> mean and std over frames -> linear -> L2 norm.
    No per-clip mean normalisation of the log-mel: the average spectrum is part of a voice.
    Trained by train_sv.py; ~0.4 M parameters, a few ms per clip on a CPU.
    """

    def __init__(self, n_mels=40, channels=192, dim=128):
        super().__init__()
        import torchaudio.functional as AF

        self.n_mels, self.channels, self.dim = n_mels, channels, dim
        self.register_buffer("window", torch.hann_window(400), persistent=False)
        fbanks = AF.melscale_fbanks(257, 20.0, SAMPLE_RATE / 2, n_mels, SAMPLE_RATE, norm="slaney", mel_scale="slaney")
        self.register_buffer("fbanks", fbanks, persistent=False)  # (257, n_mels)
        layers, width = [], n_mels
        for out, kernel, dilation in ((channels, 5, 1), (channels, 3, 2), (channels, 3, 3), (2 * channels, 1, 1)):
            layers += [nn.Conv1d(width, out, kernel, dilation=dilation, padding=dilation * (kernel - 1) // 2),
                       nn.ReLU(), nn.BatchNorm1d(out)]
            width = out
        self.input_norm = nn.BatchNorm1d(n_mels)
        self.frames = nn.Sequential(*layers)
        self.embed = nn.Linear(2 * width, dim)

    def settings(self):
        return {"n_mels": self.n_mels, "channels": self.channels, "dim": self.dim}

    def forward(self, wav):
        if wav.shape[-1] < 400:
            raise ValueError(f"tiny_sv: clip of {wav.shape[-1]} samples is shorter than one 25 ms window")
        logmel = log_mel(wav, 512, 160, self.window, self.fbanks).transpose(1, 2)  # (B, mels, frames)
        h = self.frames(self.input_norm(logmel))
        pooled = torch.cat([h.mean(-1), h.std(-1, correction=0)], dim=-1)
        return F.normalize(self.embed(pooled), dim=-1)


def load_tiny_sv(path):
    """TinySVNet from a train_sv.py file (safetensors, settings in its metadata), frozen, in eval mode;
    a clear error naming the file when it is missing or not such a file."""
    if not path:
        raise FileNotFoundError("tiny_sv: no weights given; train them with `python train_sv.py` (the pipeline's "
                                "`sv` step does) and set speaker_paths['tiny_sv'] to the file it writes")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tiny_sv: speaker_paths['tiny_sv'] = {path} does not exist")
    settings = files.read_json_metadata(path, "tiny_sv")
    if not isinstance(settings, dict):
        raise ValueError(f"tiny_sv: {path} is not a train_sv.py file (no __metadata__['tiny_sv'])")
    net = TinySVNet(**settings)
    state, want = files.load_safetensors(path), net.state_dict()
    wrong = sorted(set(want) ^ set(state)) + [k for k in want if k in state and want[k].shape != state[k].shape]
    if wrong:
        raise ValueError(f"tiny_sv: {path} does not match its settings {settings}: tensor {wrong[0]!r} is missing, "
                         f"unexpected or of another shape ({len(wrong)} are)")
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)


class TinySV(WeightsFile):
    """The `tiny_sv` extractor: a trained TinySVNet file, frozen."""

    def __init__(self, path):
        super().__init__()
        self.net, self.name, self.path = load_tiny_sv(path), "tiny_sv", path
        self.dim = self.net.dim

    def forward(self, wav):
        return self.net(wav)

    def train(self, mode=True):
        """Always eval: BatchNorm uses the statistics it was trained with."""
        return super().train(False)


class SpeakerFeatures(nn.Module):
    """The configured extractors, frozen: wav (mono 16 kHz) -> (B, dim), their outputs concatenated.

    `slices[name]` is each extractor's part of the vector (per-encoder losses split the cached
    reference features with it).
    """

    def __init__(self, extractors):
        super().__init__()
        self.extractors = nn.ModuleDict(extractors)
        self.slices, start = {}, 0
        for name, ext in self.extractors.items():
            self.slices[name] = slice(start, start + ext.dim)
            start += ext.dim
        self.dim = start
        self.requires_grad_(False)
        self.eval()

    def fingerprint(self):
        """Hash of every extractor's settings and weights, in order (part of the data-cache key)."""
        parts = [[name, ext.dim, ext.fingerprint()] for name, ext in self.extractors.items()]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def embed(self, wav, differentiable=False, split=False):
        """Features (B, dim) of mono 16 kHz audio: a (B, N) or (N,) tensor / array, or a list of
        1-D clips of any lengths (each embedded on its own, so no padding enters the statistics).

        differentiable=True keeps the autograd graph from the waveform (ReFL losses); otherwise
        runs under no_grad. split=True returns {name: (B, dim_name)} instead of the concatenation.
        """
        if isinstance(wav, (list, tuple)):
            parts = [self.embed(w, differentiable, split) for w in wav]
            if split:
                return {k: torch.cat([p[k] for p in parts]) for k in self.extractors}
            return torch.cat(parts)
        if not torch.is_tensor(wav):
            wav = torch.as_tensor(np.asarray(wav, dtype=np.float32))
        if wav.dim() == 1:
            wav = wav[None]
        if wav.dim() != 2 or not wav.is_floating_point():
            raise ValueError(
                f"speaker features expect mono float audio (B, N) or (N,), got {tuple(wav.shape)} {wav.dtype}")
        wav = wav.to(self.device, torch.float32)
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            out = {name: ext(wav) for name, ext in self.extractors.items()}
        return out if split else torch.cat(list(out.values()), dim=-1)

    def forward(self, wav):
        return self.embed(wav, differentiable=False)

    @property
    def device(self):
        return next(itertools.chain(self.parameters(), self.buffers())).device

    def train(self, mode=True):
        """Always in eval mode (no dropout in WavLM): the extractors are frozen scorers."""
        return super().train(False)


def build_speaker_extractors(names, paths, device="cpu"):
    """SpeakerFeatures for the extractor `names` (in order), weights from `paths` {name: local path}."""
    if not names:
        raise ValueError(f"speaker_extractors is empty: name at least one of {', '.join(KNOWN)}")
    if len(set(names)) != len(names):
        raise ValueError(f"speaker_extractors lists an extractor twice: {names}")
    unknown = set(paths) - set(KNOWN)
    if unknown:
        raise KeyError(f"speaker_paths names unknown extractors {sorted(unknown)} (known: {', '.join(KNOWN)})")
    extractors = {}
    for name in names:
        if name == "wavlm_sv":
            extractors[name] = WavLMSV(paths.get(name))
        elif name == "mel_stats":
            extractors[name] = MelStats()
        elif name == "tiny_sv":
            extractors[name] = TinySV(paths.get(name))
        elif name in PLUG_DIMS:
            extractors[name] = ExportedExtractor(name, paths.get(name))
        else:
            raise KeyError(f"unknown speaker extractor '{name}' (known: {', '.join(KNOWN)})")
    return SpeakerFeatures(extractors).to(device)
