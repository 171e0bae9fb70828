"""GE2E speaker embeddings in PyTorch: resemblyzer's VoiceEncoder, an independent evaluation yardstick.

An evaluation tool only: nothing that trains or samples imports this module, and no loss uses it
(tests/test_eval_isolation.py checks it), so it can judge the speaker path without having shaped
it. The network and its weights are those of the `resemblyzer` wheel (Resemblyzer 0.1.4, a GE2E
encoder, Wan et al. 2018, trained by its authors on LibriSpeech, VoxCeleb 1 and 2): its
`pretrained.pt` is read with `torch.load(weights_only=True)` from the installed package, found with
`importlib.util.find_spec` and never imported (its modules import librosa and webrtcvad; setup.sh
installs the wheel with `--no-deps`). tests/test_voice_encoder.py checks the embeddings against the
package itself.

From a 16 kHz mono clip to a unit vector (256,), as the package does it:

    volume up to -30 dBFS (never down) -> long silences cut (30 ms windows, see below)
    -> power mel spectrogram: 25 ms Hann window, 10 ms hop, 40 Slaney mels, centred, zero-padded
    -> partial windows of 160 frames (1.6 s), 1.3 per second, the last kept if it is >= 75% audio
    -> 3-layer LSTM (256) -> last hidden state -> Linear 256 -> ReLU -> L2 norm, per partial
    -> mean of the partials, L2 norm

Silence trimming: the package flags 30 ms windows as speech with webrtcvad (mode 3, a fixed-point
GMM voice-activity detector in C), smooths the flags (a window is speech when at least 5 of the 8
around it are) and widens each speech region by 3 windows on either side; audio outside is
dropped. We keep the windows, the smoothing and the widening, and replace the webrtcvad decision
with an energy one: a window is loud when its RMS is within ACTIVE_DB of the clip's loudest
window, and the flag hangs over 2-3 windows after loud ones, as webrtcvad's does. Porting
webrtcvad itself (fixed-point band energies, an adaptive two-Gaussian noise / speech model) would
be many times this file for a step that only decides which silences to drop. What it costs is
measured in tests/test_voice_encoder.py: the smoothing and widening equal the package's for the
same flags; with webrtcvad's decision replaced by ours, eSpeak speech with gaps of near-silence
or noise embeds within a cosine of 0.998 of the package's embedding (keeping the gaps,
`trim=False`: 0.91-0.99); over a wider sweep (twelve voices; gaps down to -40 dB, noise, cut
clips) the mean stayed >= 0.993 and the worst clip at 0.96. Speech without long silences is
left as it is.
"""

import importlib.util
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from audio import SAMPLE_RATE  # a constant only: this evaluation tool stays apart from training

N_FFT, HOP, N_MELS = 400, 160, 40  # 25 ms window, 10 ms hop
PARTIAL_FRAMES = 160  # 1.6 s per partial window
PARTIALS_PER_SECOND = 1.3  # the package's default rate: a new partial every 77 frames
MIN_COVERAGE = 0.75  # the last partial is kept only if this much of it is audio
TARGET_DBFS = -30.0
VAD_WINDOW = 480  # 30 ms
VAD_SMOOTH = 8  # windows in the moving average of the speech flags
VAD_WIDEN = 3  # windows added on each side of speech (the package's dilation by 7)
VAD_LONG_RUN, VAD_HANG_SHORT, VAD_HANG_LONG = 6, 2, 3  # webrtcvad's hangover at 30 ms, mode 3
# our energy decision: windows this far below the loudest one are quiet. 25 dB came out of a
# sweep (25 / 30 / 35 dB) against webrtcvad on eSpeak speech as it is, cut, with added noise
# and with 0.5-0.8 s gaps of noise at -80 / -50 / -40 dB: the lowest mean cosine to the
# package's embedding, over those six sets, was 0.993 (0.976 at 30 dB, 0.959 at 35 dB).
ACTIVE_DB = 25.0
INT16_MAX = 2 ** 15 - 1  # the package measures levels on the 16-bit scale


def weights_path():
    """Path of `pretrained.pt` inside the installed resemblyzer package (not imported)."""
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the GE2E weights come from the resemblyzer wheel: "
                                "pip install --no-deps resemblyzer==0.1.4 (setup.sh does it)")
    path = os.path.join(spec.submodule_search_locations[0], "pretrained.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found in the installed resemblyzer package")
    return path


class VoiceEncoder(nn.Module):
    """The GE2E network: mel partials (B, 160, 40) -> unit embeddings (B, 256)."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(N_MELS, 256, num_layers=3, batch_first=True)
        self.linear = nn.Linear(256, 256)

    def forward(self, mels):
        _, (hidden, _) = self.lstm(mels)  # hidden: (layers, B, 256)
        return F.normalize(F.relu(self.linear(hidden[-1])), dim=-1)


def load_encoder(path=None):
    """The pretrained VoiceEncoder (eval mode, CPU) from resemblyzer's `pretrained.pt`."""
    path = path or weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)["model_state"]
    encoder = VoiceEncoder()
    # the file also holds the GE2E loss's similarity scale and bias: not part of the embedding
    encoder.load_state_dict({k: v for k, v in state.items() if not k.startswith("similarity_")})
    return encoder.eval()


# -----------------------------------------------------------------------------------------------
# audio -> mel partials


def normalize_volume(wav):
    """Raise the clip's RMS to TARGET_DBFS; a louder clip is left as it is. wav: (N,) float."""
    rms = float(np.sqrt(np.mean(np.square(wav.double().numpy() * INT16_MAX))))
    gain_db = TARGET_DBFS - 20 * np.log10(rms / INT16_MAX)
    return wav * 10 ** (gain_db / 20) if gain_db > 0 else wav


def speech_windows(wav):
    """Speech flags per 30 ms window, (W,) bool, for a clip (N,) with N a multiple of VAD_WINDOW.

    A window is loud when its RMS is within ACTIVE_DB of the loudest window's; like webrtcvad, the
    flag then hangs over into the quiet windows after a loud run: 3 windows after a run of 7 or
    more, 2 after a shorter one (its "very aggressive" mode at 30 ms)."""
    rms = wav.reshape(-1, VAD_WINDOW).double().pow(2).mean(1).sqrt()
    db = 20 * torch.log10(rms.clamp(min=1e-10))
    loud = (db > db.max() - ACTIVE_DB).tolist()
    flags, run, hang = [], 0, 0
    for is_loud in loud:
        if is_loud:
            run += 1
            hang = VAD_HANG_LONG if run > VAD_LONG_RUN else VAD_HANG_SHORT
        else:
            run = 0
            is_loud, hang = hang > 0, max(0, hang - 1)
        flags.append(is_loud)
    return np.array(flags)


def trim_silences(wav, flags=None):
    """Drop long silences as the package does, from per-window speech `flags` (default: the energy
    decision). The tail that does not fill a 30 ms window is dropped too. wav: (N,) -> (M,)."""
    wav = wav[: len(wav) // VAD_WINDOW * VAD_WINDOW]
    flags = speech_windows(wav) if flags is None else np.asarray(flags, bool)
    # moving average over the 3 windows before, the window and the 4 after; rounding half to even,
    # so a window is speech when at least 5 of the 8 are
    votes = np.convolve(flags.astype(np.int64), np.ones(VAD_SMOOTH, np.int64))
    votes = votes[VAD_SMOOTH // 2: VAD_SMOOTH // 2 + len(flags)]
    smooth = votes > VAD_SMOOTH // 2
    widened = np.convolve(smooth, np.ones(2 * VAD_WIDEN + 1, np.int64))[VAD_WIDEN: VAD_WIDEN + len(flags)] > 0
    return wav[torch.from_numpy(np.repeat(widened, VAD_WINDOW))]


def mel_frames(wav):
    """Power mel spectrogram (T, 40) of a 16 kHz clip (N,), T = N // 160 + 1."""
    import torchaudio.functional as AF

    spec = torch.stft(wav.float(), N_FFT, HOP, window=torch.hann_window(N_FFT), center=True,
                      pad_mode="constant", return_complex=True).abs().pow(2)  # (201, T)
    fbanks = AF.melscale_fbanks(N_FFT // 2 + 1, 0.0, SAMPLE_RATE / 2, N_MELS, SAMPLE_RATE,
                                norm="slaney", mel_scale="slaney")  # (201, 40)
    return spec.T @ fbanks


def partial_starts(n_samples):
    """First mel frame of each partial window of a clip of `n_samples` (always at least one)."""
    n_frames = int(np.ceil((n_samples + 1) / HOP))
    step = int(round(SAMPLE_RATE / PARTIALS_PER_SECOND / HOP))  # 77 frames
    starts = list(range(0, max(1, n_frames - PARTIAL_FRAMES + step + 1), step))
    coverage = (n_samples - starts[-1] * HOP) / (PARTIAL_FRAMES * HOP)
    return starts[:-1] if coverage < MIN_COVERAGE and len(starts) > 1 else starts


def partials(wav, trim=True):
    """A 16 kHz clip (N,) -> its mel partials (P, 160, 40), after volume and silence handling."""
    wav = normalize_volume(wav.float())
    if trim:
        wav = trim_silences(wav)
    starts = partial_starts(len(wav))
    end = (starts[-1] + PARTIAL_FRAMES) * HOP
    wav = F.pad(wav, (0, max(0, end - len(wav))))  # zeros up to the end of the last partial
    mel = mel_frames(wav)
    return torch.stack([mel[s:s + PARTIAL_FRAMES] for s in starts])


# -----------------------------------------------------------------------------------------------
# embeddings, centroids, identification


def check_clip(wav, name):
    """A clear error for a clip the encoder cannot embed: empty, not finite, or silent."""
    if wav.ndim != 1 or wav.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty mono clip, got shape {tuple(wav.shape)}")
    if not torch.isfinite(wav).all():
        raise ValueError(f"{name}: contains NaN or infinite samples")
    if wav.abs().max() == 0:
        raise ValueError(f"{name}: is silent (all samples zero)")
    if wav.numel() < VAD_WINDOW:
        raise ValueError(f"{name}: {wav.numel()} samples, shorter than {VAD_WINDOW} (30 ms at 16 kHz)")


@torch.no_grad()
def embed(encoder, wavs, names=None, trim=True, batch_size=64):
    """Utterance embeddings (N, 256) of 16 kHz mono clips [(n_i,)]: the renormalised mean of each
    clip's partial embeddings. `names` (file paths) label the errors of bad clips."""
    names = names or [f"clip {i}" for i in range(len(wavs))]
    chunks, owner = [], []
    for i, (wav, name) in enumerate(zip(wavs, names)):
        wav = torch.as_tensor(wav)
        check_clip(wav, name)
        chunks.append(partials(wav, trim))
        owner += [i] * len(chunks[-1])
    mels = torch.cat(chunks)  # every partial has 160 frames: all clips batch together
    parts = torch.cat([encoder(mels[j:j + batch_size]) for j in range(0, len(mels), batch_size)])
    sums = torch.zeros(len(wavs), parts.shape[1]).index_add_(0, torch.tensor(owner), parts)
    return F.normalize(sums, dim=-1)


def centroids_from_clips(embeddings, speakers):
    """{speaker: unit centroid (256,)}: the renormalised mean of each speaker's clip embeddings."""
    out = {}
    for spk in sorted(set(speakers)):
        rows = embeddings[[i for i, s in enumerate(speakers) if s == spk]]
        out[spk] = F.normalize(rows.mean(0), dim=-1)
    return out


def clip_scores(embeddings, speakers, centroids):
    """Per clip, against speaker centroids {speaker: (256,)}: (recognised (N,) 0/1, margin (N,)).

    A clip is recognised when its nearest centroid by cosine is its own speaker's. margin =
    cos(e, c_own) - mean over the other speakers s of cos(e, c_s): the definition judge.py uses,
    so the two judges' margins read alike (the mean, not the closest other, keeps the margin
    smooth when two other voices are near each other).
    """
    names = sorted(centroids)
    unknown = sorted(set(speakers) - set(names))
    if unknown:
        raise ValueError(f"speakers {unknown} have no centroid (known: {names})")
    if len(speakers) != len(embeddings) or not len(speakers):
        raise ValueError(f"need one speaker per embedding, got {len(embeddings)} and {len(speakers)}")
    own = torch.tensor([names.index(s) for s in speakers])
    sims = embeddings @ torch.stack([centroids[s] for s in names]).T  # (N, S)
    own_sim = sims.gather(1, own[:, None])[:, 0]
    margin = own_sim - (sims.sum(1) - own_sim) / max(1, len(names) - 1)
    return (sims.argmax(1) == own).float(), margin


def identify(embeddings, speakers, centroids):
    """Identification of clips (N, 256) of `speakers` against `centroids` {speaker: (256,)}:
    {n, accuracy, chance, margin, per_speaker: {speaker: {n, accuracy, margin}}}, means over
    clips of clip_scores."""
    correct, margin = clip_scores(embeddings, speakers, centroids)
    per_speaker = {}
    for spk in sorted(set(speakers)):
        mask = torch.tensor([s == spk for s in speakers])
        per_speaker[spk] = {"n": int(mask.sum()), "accuracy": float(correct[mask].mean()),
                            "margin": float(margin[mask].mean())}
    return {"n": len(speakers), "accuracy": float(correct.mean()), "chance": 1.0 / len(centroids),
            "margin": float(margin.mean()), "per_speaker": per_speaker}
