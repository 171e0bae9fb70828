"""The speaker judge: a small speaker-identification classifier, trained on real corpus clips only.

It shows whether speaker conditioning works without sharing anything with the generator: its
features are statistics of a log-mel spectrogram it computes itself, and it is trained on the
corpus's `judge` split, which the generator never sees (plus degraded copies of those clips, so
that it scores the voice rather than the audio quality). For a generated clip with reference
speaker s it reports (a) whether it recognises s and (b) the margin between the clip's cosine
similarity to s's centroid and its mean similarity to the other speakers' centroids.

    python judge.py --corpus data/tiny [--out runs/judge.safetensors --seed 0]

trains on `judge.jsonl`, then reports accuracy and margin on the held-out real clips of
`val.jsonl`, as they are and after a mel -> Griffin-Lim round trip (the "ceiling" a mel codec
with a Griffin-Lim decoder can reach), and saves the judge.
"""

import argparse
import contextlib
import functools
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchaudio

import files
from audio import SAMPLE_RATE, resample

N_FFT, HOP, N_MELS = 1024, 160, 80  # 64 ms windows resolve harmonics of f0 down to ~60 Hz
ACTIVE_DB = 35.0  # frames more than this below the clip's loudest frame are silence: skipped
FEATURE_DIM = 3 * N_MELS  # per-bin mean, std and mean |delta| of the active frames


@contextlib.contextmanager
def one_thread():
    """Run torch on one CPU thread inside the block. The judge's tensors are tiny (a 2 s STFT, a
    240 -> 128 MLP): intra-op threads only add overhead, up to 10x when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _mel_transform():
    return torchaudio.transforms.MelSpectrogram(SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP,
                                                n_mels=N_MELS, power=1.0, norm="slaney",
                                                mel_scale="slaney")


def _as_tensor(wav, sample_rate):
    """A mono 1-D float32 tensor at 16 kHz from a numpy array or tensor of shape (T,) or (C, T)."""
    wav = torch.as_tensor(np.asarray(wav) if not torch.is_tensor(wav) else wav).float()
    if wav.dim() == 2:
        wav = wav.mean(0)
    if wav.dim() != 1 or wav.numel() == 0:
        raise ValueError(f"expected a mono clip of shape (T,) or (C, T), got shape {tuple(wav.shape)}")
    if not torch.isfinite(wav).all():
        raise ValueError(f"clip of {wav.numel()} samples has NaN/Inf values")
    return resample(wav, sample_rate, SAMPLE_RATE)


def features(wavs, sample_rate=SAMPLE_RATE):
    """(N, FEATURE_DIM) clip statistics of the log-mel spectrogram over non-silent frames.

    Clips are scaled to unit RMS first, so loudness is not a cue. Mean and std per mel bin carry
    the spectral envelope (formants, breathiness) and the pitch harmonics; mean |delta| carries
    how fast the spectrum moves (tempo, pitch range).
    """
    mel = _mel_transform()
    rows = []
    for wav in wavs:
        wav = _as_tensor(wav, sample_rate)
        wav = F.pad(wav, (0, max(0, N_FFT - len(wav))))  # the centred STFT needs > N_FFT/2 samples
        wav = wav / wav.pow(2).mean().sqrt().clamp_min(1e-8)
        logmel = torch.log(mel(wav).clamp_min(1e-5)).T  # (frames, N_MELS)
        energy = torch.logsumexp(2 * logmel, dim=1) * (10 / math.log(10))  # frame power in dB
        active = logmel[energy > energy.max() - ACTIVE_DB]
        delta = (active[1:] - active[:-1]).abs().mean(0) if len(active) > 1 else torch.zeros(N_MELS)
        rows.append(torch.cat([active.mean(0), active.std(0, unbiased=False), delta]))
    return torch.stack(rows)


class Judge(nn.Module):
    """Standardised clip features -> MLP embedding (dim) -> speaker logits."""

    def __init__(self, speakers, dim=64):
        super().__init__()
        self.speakers = list(speakers)
        self.register_buffer("feat_mean", torch.zeros(FEATURE_DIM))
        self.register_buffer("feat_std", torch.ones(FEATURE_DIM))
        self.register_buffer("centroids", torch.zeros(len(self.speakers), dim))  # unit-norm means
        self.encoder = nn.Sequential(nn.Linear(FEATURE_DIM, 128), nn.GELU(), nn.Dropout(0.2),
                                     nn.Linear(128, dim))
        self.head = nn.Linear(dim, len(self.speakers))

    def forward(self, feats):
        """feats (N, FEATURE_DIM) -> embedding (N, dim), logits (N, S)."""
        emb = self.encoder((feats - self.feat_mean) / self.feat_std)
        return emb, self.head(F.gelu(emb))

    @torch.no_grad()
    def predict_proba(self, wavs, sample_rate=SAMPLE_RATE):
        """(N, S) probabilities over `self.speakers` for a list of clips."""
        self.eval()
        return self(features(wavs, sample_rate))[1].softmax(-1)

    @torch.no_grad()
    def embed(self, wavs, sample_rate=SAMPLE_RATE):
        """(N, dim) unit-norm embeddings, for cosine similarities to `self.centroids`."""
        self.eval()
        return F.normalize(self(features(wavs, sample_rate))[0], dim=-1)


def train_judge(wavs, speaker_ids, sample_rate=SAMPLE_RATE, seed=0, augment_copies=2, steps=400,
                lr=3e-3):
    """Train a Judge on real clips with their speaker labels: each clip plus `augment_copies`
    degraded copies of it (`augment`), full-batch AdamW. ~10 s on one CPU core for 80 clips."""
    if len(wavs) != len(speaker_ids):
        raise ValueError(f"{len(wavs)} clips but {len(speaker_ids)} speaker labels")
    speakers = sorted(set(speaker_ids))
    if len(speakers) < 2:
        raise ValueError(f"a judge needs at least 2 speakers, got {speakers}")
    with one_thread():
        wavs = [_as_tensor(w, sample_rate) for w in wavs]
        rng = random.Random(seed)
        wavs = wavs + [augment(w, rng) for _ in range(augment_copies) for w in wavs]
        speaker_ids = list(speaker_ids) * (1 + augment_copies)
        torch.manual_seed(seed)
        feats = features(wavs)  # (N, FEATURE_DIM)
        labels = torch.tensor([speakers.index(s) for s in speaker_ids])
        judge = Judge(speakers)
        judge.feat_mean.copy_(feats.mean(0))
        judge.feat_std.copy_(feats.std(0, unbiased=False).clamp_min(1e-3))
        opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-2)
        judge.train()
        for _ in range(steps):
            loss = F.cross_entropy(judge(feats)[1], labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        judge.eval()
        with torch.no_grad():  # centroids over real and augmented clips alike
            emb = F.normalize(judge(feats)[0], dim=-1)
            for k in range(len(speakers)):
                judge.centroids[k] = F.normalize(emb[labels == k].mean(0), dim=0)
    return judge


def judge_report(judge, wavs, ref_speaker_ids, sample_rate=SAMPLE_RATE):
    """Accuracy, chance and similarity margin of `wavs` against their reference speakers.

    margin = mean over clips of cos(e, c_ref) - mean_{s != ref} cos(e, c_s), with e the clip's
    embedding and c the speakers' centroids on the judge's training clips.
    """
    unknown = sorted(set(ref_speaker_ids) - set(judge.speakers))
    if unknown:
        raise ValueError(f"reference speakers {unknown} are not among the judge's {judge.speakers}")
    if len(wavs) != len(ref_speaker_ids) or not wavs:
        raise ValueError(f"need one reference speaker per clip, got {len(wavs)} clips and "
                         f"{len(ref_speaker_ids)} labels")
    ref = torch.tensor([judge.speakers.index(s) for s in ref_speaker_ids])
    feats = features(wavs, sample_rate)
    with torch.no_grad():
        judge.eval()
        emb, logits = judge(feats)
        sims = F.normalize(emb, dim=-1) @ judge.centroids.T  # (N, S)
    correct = (logits.argmax(-1) == ref).float()
    own = sims.gather(1, ref[:, None])[:, 0]
    others = (sims.sum(1) - own) / (sims.shape[1] - 1)
    margin = own - others
    per_speaker = {}
    for k, spk in enumerate(judge.speakers):
        mask = ref == k
        if mask.any():
            per_speaker[spk] = {"n": int(mask.sum()), "accuracy": float(correct[mask].mean()),
                                "margin": float(margin[mask].mean())}
    return {"n": len(wavs), "accuracy": float(correct.mean()), "chance": 1.0 / len(judge.speakers),
            "margin": float(margin.mean()), "per_speaker": per_speaker}


def _feature_settings():
    return {"sample_rate": SAMPLE_RATE, "n_fft": N_FFT, "hop": HOP, "n_mels": N_MELS, "active_db": ACTIVE_DB}


def save_judge(judge, path):
    """Write the judge as safetensors (its weights) with its speakers and feature settings as JSON
    metadata, atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    files.save_safetensors(judge.state_dict(), path, {"format": "speakerbox.judge", "speakers": judge.speakers,
                                                      "features": _feature_settings()})


def load_judge(path):
    """Read a judge written by `save_judge`; refuses another file or one made with other feature settings."""
    if files.read_safetensors_metadata(path).get("format") != "speakerbox.judge":
        raise files.BadFile(f"{path}: not a judge written by judge.py (no format 'speakerbox.judge' in its metadata)")
    features = files.read_json_metadata(path, "features")
    if features != _feature_settings():
        raise ValueError(f"{path}: judge features {features} differ from this judge.py's {_feature_settings()}")
    state = files.load_safetensors(path)
    judge = Judge(files.read_json_metadata(path, "speakers"), state["centroids"].shape[1])
    judge.load_state_dict(state)
    return judge.eval()


@functools.lru_cache(maxsize=None)
def _codec_mel(n_iter):
    """The codec's mel (the LTX audio VAE's input: n_fft 1024, hop 160, 64 Slaney bins, power 1), its least-squares
    inverse onto the linear spectrogram, and Griffin-Lim with `n_iter` iterations."""
    to_mel = torchaudio.transforms.MelSpectrogram(SAMPLE_RATE, n_fft=1024, hop_length=160, n_mels=64,
                                                  power=1.0, norm="slaney", mel_scale="slaney")
    inv = torchaudio.transforms.InverseMelScale(1024 // 2 + 1, n_mels=64, sample_rate=SAMPLE_RATE,
                                                norm="slaney", mel_scale="slaney")
    gl = torchaudio.transforms.GriffinLim(n_fft=1024, hop_length=160, power=1.0, n_iter=n_iter)
    return to_mel, inv, gl


def mel_griffin_lim(wav, sample_rate=SAMPLE_RATE, n_iter=32, blur_t=1, blur_f=1, log_noise=0.0,
                    seed=0):
    """Round trip a clip through the codec's log-mel and back with InverseMelScale + Griffin-Lim.

    Unchanged (blur 1, no noise) this is the best a mel codec decoded this way can sound: the
    judge's ceiling on generated audio. `blur_t` / `blur_f` (odd box widths in frames / mel bins)
    and `log_noise` (std of Gaussian noise on the log-mel) imitate a generator's smeared, noisy mels.
    """
    wav = _as_tensor(wav, sample_rate)
    to_mel, inv, gl = _codec_mel(n_iter)
    logmel = torch.log(to_mel(wav).clamp_min(1e-5))  # (64, frames)
    with torch.random.fork_rng(devices=[]):  # Griffin-Lim starts from random phases: fixed ones
        torch.manual_seed(seed)
        if blur_t > 1 or blur_f > 1:
            logmel = F.avg_pool2d(logmel[None, None], (blur_f, blur_t), stride=1,
                                  padding=(blur_f // 2, blur_t // 2), count_include_pad=False)[0, 0]
        if log_noise > 0:
            logmel = logmel + log_noise * torch.randn_like(logmel)
        out = gl(inv(logmel.exp()).clamp_min(0))
    return F.pad(out, (0, len(wav) - len(out)))[: len(wav)]  # istft drops the last partial hop


def augment(wav, rng):
    """A randomly degraded copy of a real 16 kHz clip, the way generated audio is degraded: a
    blurred, noisy mel decoded by Griffin-Lim, sometimes with white noise at 10-30 dB SNR.
    Training on these makes the judge score the voice rather than the audio quality."""
    out = mel_griffin_lim(wav, n_iter=16, blur_t=rng.choice([1, 3, 5, 7]), blur_f=rng.choice([1, 1, 3]),
                          log_noise=rng.choice([0.0, 0.3, 0.7]), seed=rng.randrange(2**31))
    snr_db = rng.choice([None, 30, 20, 10])
    if snr_db is not None:
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        noise = torch.randn(out.shape, generator=gen)
        out = out + noise * out.pow(2).mean().sqrt() * 10 ** (-snr_db / 20)
    return out


def load_split(manifest):
    """(wavs, speaker ids) of every clip of a corpus manifest (JSONL, paths relative to it)."""
    manifest = Path(manifest)
    wavs, speakers = [], []
    with open(manifest, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not row.get("speaker"):
                raise ValueError(f"{manifest}:{lineno}: a judge clip needs a 'speaker'")
            wav, sr = sf.read(manifest.parent / row["audio"], dtype="float32", always_2d=True)
            wavs.append(_as_tensor(wav.T, sr))
            speakers.append(row["speaker"])
    return wavs, speakers


def main(argv=None):
    parser = argparse.ArgumentParser(description="train the speaker judge on a corpus and test it")
    parser.add_argument("--corpus", required=True, help="corpus directory (corpus.py --out)")
    parser.add_argument("--out", default="", help="where to save the judge (default: CORPUS/judge.safetensors)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    corpus = Path(args.corpus)
    train_wavs, train_spk = load_split(corpus / "judge.jsonl")
    test_wavs, test_spk = load_split(corpus / "val.jsonl")
    t0 = time.time()
    judge = train_judge(train_wavs, train_spk, seed=args.seed)
    t_train = time.time() - t0
    save_judge(judge, args.out or corpus / "judge.safetensors")
    print(f"judge: trained on {len(train_wavs)} real clips of {len(judge.speakers)} speakers "
          f"(+ augmented copies) in {t_train:.1f} s; tested on {len(test_wavs)} held-out clips")
    with one_thread():
        tests = {"real": test_wavs,
                 "mel->Griffin-Lim": [mel_griffin_lim(w) for w in test_wavs],  # the ceiling
                 "blurred mel->GL": [mel_griffin_lim(w, blur_t=5, log_noise=0.5, seed=i)
                                     for i, w in enumerate(test_wavs)]}
        for name, wavs in tests.items():
            r = judge_report(judge, wavs, test_spk)
            print(f"  {name:17s} accuracy {r['accuracy']:.3f} (chance {r['chance']:.3f})  "
                  f"margin {r['margin']:.3f}")


if __name__ == "__main__":
    main()
