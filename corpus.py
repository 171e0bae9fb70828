"""A small multi-speaker speech corpus, synthesised locally with eSpeak NG (no download but pip).

    python corpus.py --out data/tiny [--speakers 8 --utts_per_speaker 40 --seed 0]

eSpeak NG's library and voice data come in the `espeakng-loader` wheel; we drive the C library
through ctypes (synchronous mode, samples collected by a callback), so no system package is needed.
Each speaker is a fixed eSpeak voice (accent + variant, which sets formants, breathiness and pitch
contour) plus its own pitch, pitch range and rate: clearly different voices, see `VOICES`.
Sentences come from a small seeded grammar, so every utterance says something different.

Layout written under `--out` (paths in the manifests are relative to it):

    wavs/spk00/spk00_0000.wav      16 kHz mono PCM16, 1-4 s
    train.jsonl val.jsonl judge.jsonl      the seen voices
    val_unseen.jsonl judge_unseen.jsonl    the held-out voices (empty files when unseen = 0)
        {"audio": "wavs/...", "text": "A clear voice. \\"the red fox runs\\"", "speaker": "spk00",
         "source": "espeak", "id": "spk00_0000"}
    base.jsonl                     the base DiT's training set: every train clip of the VOICES twice, with
                                   the shared description and with its voice's own ("A deep US man. \\"...\\"")
    transcripts.tsv                id, speaker, split, raw transcript
    corpus.json                    settings, their hash, counts, voices, build time

The prompt's description is the same for every speaker: text alone cannot pick the voice, so a
model without a speaker path sits at chance on the judge and the speaker must come from the
reference clip. Only the base DiT, the stand-in for the pretrained LTX-2.3 (which learned from
captions that describe the voice), also hears each seen voice under its own description
(`base.jsonl`): it learns voices as separate modes instead of one averaged voice, and the stages
that add the speaker path start from a model that can render them. Stage 1, stage 2 and sampling
see only the shared description, so the baseline (no speaker path) stays at chance; held-out voices
appear in no training file at all.

The split is by utterance, per speaker: `judge` clips train the speaker-identification judge
(judge.py) and are never seen by the generator; `val` clips are held out from both, so they are
the references for sampling and the clean test set of the judge. The last `unseen` voices are held
out of training altogether (zero-shot cloning): their clips go to `val_unseen` and `judge_unseen`
only, never to `train`. Extra voices (`--extra_voices`, drawn from eSpeak's variants but never one
that a held-out voice uses) add training clips of more voices, in `train` only. A second call with the
same settings finds `corpus.json` with the same hash and returns at once.
"""

import argparse
import ctypes
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import soundfile as sf

import files
from audio import SAMPLE_RATE  # the codec's and the speaker extractors' rate

MIN_SECONDS, MAX_SECONDS = 1.0, 4.0
SOURCE = "espeak"
SPLITS = ("train", "val", "judge", "val_unseen", "judge_unseen")
FORMAT_VERSION = 3  # bump when the output of the same settings changes
DESCRIPTION = "A clear voice."  # LTX-style prompt: description, then the spoken line in quotes

# (eSpeak voice "language+variant", pitch 0-99, pitch range 0-99, rate words/min, description).
# A description is no longer than DESCRIPTION: the base's described prompts fit the same text length.
# Chosen to differ along several axes at once (accent, formant set, f0, breathiness, tempo), so a
# small classifier on spectral statistics separates them even after a mel -> Griffin-Lim trip.
VOICES = [
    ("en-us+m1", 30, 40, 150, "A deep US man."),
    ("en+f2", 75, 70, 175, "A bright lady."),
    ("en-gb-scotland+m3", 60, 60, 195, "A brisk Scot."),
    ("en-us+f4", 90, 50, 160, "A high woman."),
    ("en+Storm", 25, 30, 140, "A low voice."),
    ("en-029+m7", 60, 80, 205, "A fast man."),
    ("en-gb-x-rp+Annie", 55, 40, 170, "A formal lady."),
    ("en+whisper", 50, 50, 160, "A whisper."),
    ("en-us-nyc+m2", 40, 70, 185, "A NY man."),
    ("en+klatt", 65, 20, 150, "A robot voice."),
    ("en-gb-x-gbclan+f3", 80, 90, 180, "A lively lass."),
    ("en-us+m6", 45, 10, 130, "A flat man."),
    ("en-gb-x-gbcwmd+m4", 35, 50, 165, "A Brummie man."),
    ("en+f5", 70, 60, 150, "A warm woman."),
    ("en-gb-scotland+f1", 85, 40, 155, "A Scots woman."),
    ("en+grandpa", 30, 70, 135, "An old man."),
    ("en-029+f3", 65, 70, 190, "A quick woman."),
    ("en-us+m8", 50, 30, 175, "A plain man."),
    ("en+m5", 20, 50, 170, "A bass voice."),
    ("en-us-nyc+f4", 75, 80, 200, "A NY woman."),
]

# Extra training-only voices (`extra_voices`): drawn per build from these accents and eSpeak variants
# (formant sets), each with its own pitch, range and rate. A variant that a held-out voice of the
# build uses is never drawn, so the zero-shot voices' formant sets stay out of training. Novelty
# variants (Demonic, croak, the robots) and the klatt synthesiser's are left out.
EXTRA_ACCENTS = ("en", "en-us", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us-nyc", "en-gb-x-gbclan",
                 "en-gb-x-gbcwmd")
EXTRA_VARIANTS = ("Alex", "Alicia", "Andrea", "Andy", "Annie", "Denis", "Gene", "Hugo", "Jacky", "Lee",
                  "Marco", "Michael", "Mike", "Reed", "Storm", "adam", "anika", "announcer", "antonio",
                  "aunty", "belinda", "benjamin", "boris", "caleb", "david", "ed", "edward", "f1", "f2",
                  "f3", "f4", "f5", "grandma", "grandpa", "ian", "iven", "john", "linda", "m1", "m2", "m3",
                  "m4", "m5", "m6", "m7", "m8", "max", "michel", "norbert", "paul", "pedro", "quincy", "rob",
                  "robert", "steph", "travis", "victor", "whisper", "whisperf", "zac")


def draw_extra_voices(n, seed, held_out):
    """`n` training-only voices as VOICES rows, drawn from (seed): the variants in a seeded order (each
    once while the pool lasts), none that a `held_out` voice ("language+variant" names) uses; the
    first k of n voices are the k voices of a smaller draw."""
    banned = {name.partition("+")[2] for name in held_out}
    pool = [v for v in EXTRA_VARIANTS if v not in banned]
    voices = []
    for j in range(n):
        if j % len(pool) == 0:
            order = random.Random(f"{seed}-extra-{j // len(pool)}").sample(pool, len(pool))
        rng = random.Random(f"{seed}-extra-voice-{j}")
        pitch = rng.randrange(15, 91)
        description = "A deep voice." if pitch < 35 else "A high voice." if pitch > 70 else "A mid voice."
        voices.append((f"{rng.choice(EXTRA_ACCENTS)}+{order[j % len(pool)]}", pitch, rng.randrange(10, 91),
                       rng.randrange(130, 211), description))
    return voices


# A seeded grammar: "the <adj> <noun> <verb> <prep> the <adj> <noun>" and shorter variants.
ADJECTIVES = ("red", "small", "quiet", "old", "bright", "cold", "green", "happy", "dark", "tall",
              "soft", "wild", "blue", "heavy", "gentle", "sudden", "warm", "empty", "golden", "brave")
NOUNS = ("fox", "river", "garden", "window", "teacher", "horse", "lamp", "mountain", "child",
         "letter", "boat", "forest", "kettle", "doctor", "bridge", "market", "cat", "candle",
         "sailor", "village", "clock", "stone", "farmer", "road")
VERBS = ("runs", "waits", "sings", "falls", "turns", "shines", "sleeps", "moves", "rests", "calls",
         "jumps", "works", "stands", "drifts", "listens", "speaks")
PREPOSITIONS = ("over", "near", "under", "behind", "beside", "past", "through", "along", "into",
                "across")
ADVERBS = ("slowly", "today", "again", "quietly", "at night", "every morning", "once more", "softly")


def sentence(rng):
    """One random sentence of 4-8 words from the grammar."""
    subject = f"the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
    verb = rng.choice(VERBS)
    shape = rng.randrange(4)
    if shape == 0:
        return f"{subject} {verb}"
    if shape == 1:
        return f"{subject} {verb} {rng.choice(ADVERBS)}"
    place = f"{rng.choice(PREPOSITIONS)} the {rng.choice(NOUNS)}"
    if shape == 2:
        return f"{subject} {verb} {place}"
    return f"{subject} {verb} {rng.choice(PREPOSITIONS)} the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"


def prompt(spoken, description=DESCRIPTION):
    """The manifest's text for a spoken line: the description (the shared one unless given), then
    the line in quotes."""
    return f'{description} "{spoken}"'


# ----------------------------------------------------------------------------------------------
# eSpeak NG through ctypes


class Espeak:
    """The eSpeak NG C library in synchronous mode; `synth` returns float32 samples at `rate`."""

    # espeak_AUDIO_OUTPUT and espeak_PARAMETER values from speak_lib.h
    AUDIO_OUTPUT_SYNCHRONOUS = 2
    RATE, PITCH, RANGE = 1, 3, 4
    POS_CHARACTER, CHARS_UTF8 = 1, 1
    CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                ctypes.c_void_p)
    _instance = None

    def __init__(self):
        try:
            import espeakng_loader
        except ImportError:
            raise ImportError("corpus.py needs eSpeak NG from pip: pip install espeakng-loader") from None
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                     ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        data_path = espeakng_loader.get_data_path()
        self.rate = lib.espeak_Initialize(self.AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), 0)
        if self.rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed (returned {self.rate})")
        self._chunks = []
        self._callback = self.CALLBACK(self._collect)  # kept alive: the library holds a pointer
        lib.espeak_SetSynthCallback(self._callback)
        self.lib = lib
        # eSpeak falls back to the plain voice on an unknown variant without a word: check names
        self.variants = set(os.listdir(os.path.join(data_path, "voices", "!v")))
        # breathy and rough voices add noise from espeak's own PRNG and from libc rand(): both
        # are reseeded per utterance so a corpus is the same file for file on every build
        self.libc = ctypes.CDLL(None)
        self.libc.srand.argtypes = [ctypes.c_uint]

    @classmethod
    def get(cls):
        """The process-wide instance (the library has global state; initialise it once)."""
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def _collect(self, wav, n, events):
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def synth(self, text, voice, pitch, pitch_range, rate, seed=0):
        """Speak `text` with an eSpeak voice ("language+variant") and settings; (samples,) float32
        in [-1, 1]. `seed` fixes the noise of breathy voices."""
        variant = voice.partition("+")[2]
        if variant and variant not in self.variants:
            raise ValueError(f"eSpeak voice variant '{variant}' (in '{voice}') not found in the "
                             f"espeakng-loader data")
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"eSpeak voice '{voice}' not found in the espeakng-loader data")
        for param, value in ((self.RATE, rate), (self.PITCH, pitch), (self.RANGE, pitch_range)):
            self.lib.espeak_SetParameter(param, value, 0)
        self.lib.espeak_ng_SetRandSeed(seed)
        self.libc.srand(seed)
        self._chunks = []
        data = text.encode()
        err = self.lib.espeak_Synth(data, len(data) + 1, 0, self.POS_CHARACTER, 0, self.CHARS_UTF8,
                                    None, None)
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed on {text!r} (error {err})")
        self.lib.espeak_Synchronize()
        if not self._chunks:
            raise RuntimeError(f"eSpeak produced no audio for {text!r} with voice '{voice}'")
        return np.concatenate(self._chunks).astype(np.float32) / 32768.0


# ----------------------------------------------------------------------------------------------
# building


def settings_hash(settings):
    """Short stable hash of the build settings (the cache key)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def split_counts(n, val_frac, judge_frac):
    """(train, val, judge) utterance counts for one speaker; every split gets one when n >= 3."""
    if n < 3:
        raise ValueError(f"utts_per_speaker must be at least 3 (one per split), got {n}")
    n_val = max(1, round(n * val_frac))
    n_judge = max(1, round(n * judge_frac))
    n_train = n - n_val - n_judge
    if n_train < 1:
        raise ValueError(f"val_frac {val_frac} + judge_frac {judge_frac} leave no training clip "
                         f"out of {n} per speaker")
    return n_train, n_val, n_judge


def resample(wav, rate, new_rate):
    """Band-limited resampling of a whole clip in the frequency domain: keep the bins below the
    new Nyquist frequency (an ideal low-pass). eSpeak clips start and end in silence, so the
    transform's wrap-around is harmless, and it is ~50x cheaper here than a polyphase filter."""
    n = round(len(wav) * new_rate / rate)
    spectrum = np.fft.rfft(wav)[: n // 2 + 1]
    return (np.fft.irfft(spectrum, n) * (n / len(wav))).astype(np.float32)


def utterance(engine, rng, voice):
    """Synthesise random sentences until one lasts MIN_SECONDS..MAX_SECONDS; (text, wav 16 kHz)."""
    name, pitch, pitch_range, rate, _ = voice
    for _ in range(50):
        text = sentence(rng)
        wav = engine.synth(text, name, pitch, pitch_range, rate, seed=rng.randrange(2**31))
        wav = resample(wav, engine.rate, SAMPLE_RATE)
        if MIN_SECONDS <= len(wav) / SAMPLE_RATE <= MAX_SECONDS:
            return text, 0.9 * wav / max(float(np.abs(wav).max()), 1e-6)  # equal peak level
    raise RuntimeError(f"voice {name}: no sentence fell within {MIN_SECONDS}-{MAX_SECONDS} s")


def _splits_of(k, rng, counts, speakers, unseen, extra_utts):
    """The split of each clip of voice k, in clip order. A judged voice's (n_train, n_val, n_judge) `counts`
    are shuffled (which utterance goes where is random, not "the last ones"); a held-out voice's go to
    val_unseen / judge_unseen; an extra voice's `extra_utts` clips all go to train. The shuffle draws from
    `rng` for every voice, extra ones too, so each voice's sentences stay those of the corpora built so far."""
    n_train, n_val, n_judge = counts
    splits = ["train"] * n_train + ["val"] * n_val + ["judge"] * n_judge
    rng.shuffle(splits)
    if k >= speakers:
        return ["train"] * extra_utts
    if k >= speakers - unseen:  # nothing of a held-out voice is trained on
        return ["val_unseen" if s == "val" else "judge_unseen" for s in splits]
    return splits


def _write_manifests(out, rows, transcripts):
    """Each split's rows (and base's) as `<split>.jsonl` and the transcripts table; returns {split: file name}."""
    manifests = {}
    for split, split_rows in rows.items():
        manifests[split] = f"{split}.jsonl"
        files.write_text(out / manifests[split], "".join(json.dumps(r) + "\n" for r in split_rows))
    files.write_text(out / "transcripts.tsv", "id\tspeaker\tsplit\ttranscript\n" + "\n".join(transcripts) + "\n")
    return manifests


def build_corpus(out, speakers=8, utts_per_speaker=40, seed=0, val_frac=0.15, judge_frac=0.25, unseen=0,
                 extra_voices=0, extra_utts=20, verbose=True):
    """Build (or find cached) the corpus under `out`; returns the `corpus.json` dict.

    The result's "manifests" maps each split to its JSONL path. Speaker k's sentences depend only
    on (seed, k), so adding speakers leaves the existing ones unchanged. The last `unseen` of the
    `speakers` voices are held out of `train`: their training share goes to `judge_unseen`.
    `extra_voices` more voices (`draw_extra_voices`, speakers x00, x01, ...) add `extra_utts` clips
    each to `train` only: more voices for the speaker encoder and the speaker path (stages 1 and 2) to
    learn the mapping from a voice's features from, with nothing to judge or sample, so the judged
    voices and their clips are the same as without them. They stay out of `base`: the base DiT, the
    pretrained model's stand-in, spread over 40 voices rendered the judged ones worse (its val loss
    0.763 -> 0.80) and cost the seen voices identity (records/2026-12-03_extra_voices.md).
    """
    if not 1 <= speakers <= len(VOICES):
        raise ValueError(f"speakers must be 1..{len(VOICES)} (the voices in corpus.VOICES), got {speakers}")
    if not 0 <= unseen < speakers:
        raise ValueError(f"unseen must be 0..{speakers - 1} (at least one voice is trained on), got {unseen}")
    n_train, n_val, n_judge = split_counts(utts_per_speaker, val_frac, judge_frac)
    out = Path(out)
    settings = {"speakers": speakers, "utts_per_speaker": utts_per_speaker, "seed": seed,
                "val_frac": val_frac, "judge_frac": judge_frac, "sample_rate": SAMPLE_RATE,
                "voices": [list(v) for v in VOICES[:speakers]], "description": DESCRIPTION,
                "unseen": unseen, "version": FORMAT_VERSION}
    extras = draw_extra_voices(extra_voices, seed, [v[0] for v in VOICES[speakers - unseen:speakers]])
    if extras:  # only then a key: corpora built before extra voices existed keep their hash
        settings.update(extra_voices=extra_voices, extra_utts=extra_utts)
    digest = settings_hash(settings)
    info_path = out / "corpus.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("hash") == digest and _complete(out, info["manifests"].values()):
            if verbose:
                print(f"corpus: {out} is up to date ({info['utterances']} utterances, hash {digest})")
            return _with_paths(info, out)

    t0 = time.time()
    engine = Espeak.get()
    info_path.unlink(missing_ok=True)  # until rewritten at the end, the corpus is incomplete
    if (out / "wavs").is_dir():
        shutil.rmtree(out / "wavs")  # a stale build's clips: other settings, other files
    rows = {split: [] for split in SPLITS}
    base_rows = []  # base.jsonl: each train row, then the same clip under its voice's own description
    transcripts = []
    total_seconds = 0.0
    voices = [(f"spk{k:02d}", v) for k, v in enumerate(VOICES[:speakers])]
    voices += [(f"x{j:02d}", v) for j, v in enumerate(extras)]
    for k, (spk, voice) in enumerate(voices):
        rng = random.Random(f"{seed}-{k}" if k < speakers else f"{seed}-{spk}")
        (out / "wavs" / spk).mkdir(parents=True, exist_ok=True)
        for i, split in enumerate(_splits_of(k, rng, (n_train, n_val, n_judge), speakers, unseen, extra_utts)):
            text, wav = utterance(engine, rng, voice)
            utt_id = f"{spk}_{i:04d}"
            rel = f"wavs/{spk}/{utt_id}.wav"
            sf.write(out / rel, wav, SAMPLE_RATE, subtype="PCM_16")
            total_seconds += len(wav) / SAMPLE_RATE
            rows[split].append({"audio": rel, "text": prompt(text), "speaker": spk,
                                "source": SOURCE, "id": utt_id})
            if split == "train" and k < speakers:  # the base hears the judged voices only (see build_corpus)
                base_rows += [rows[split][-1], {**rows[split][-1], "text": prompt(text, voice[4]),
                                                "id": f"{utt_id}_described"}]
            transcripts.append(f"{utt_id}\t{spk}\t{split}\t{text}")
    manifests = _write_manifests(out, {**rows, "base": base_rows}, transcripts)
    info = {"hash": digest, "settings": settings, "manifests": manifests,
            "speakers": {spk: {"voice": v[0], "pitch": v[1], "range": v[2], "rate": v[3], "description": v[4],
                               "seen": not speakers - unseen <= k < speakers, "extra": k >= speakers}
                         for k, (spk, v) in enumerate(voices)},
            "utterances": sum(len(r) for r in rows.values()),
            "counts": {split: len(rows[split]) for split in SPLITS},
            "audio_seconds": round(total_seconds, 1), "build_seconds": round(time.time() - t0, 2)}
    files.write_text(info_path, json.dumps(info, indent=1))  # written last: its presence means complete
    if verbose:
        print(f"corpus: built {info['utterances']} utterances ({info['audio_seconds']} s of audio, "
              f"{speakers} speakers + {len(extras)} extra, splits {info['counts']}) in {info['build_seconds']} s "
              f"-> {out}")
    return _with_paths(info, out)


def _complete(out, manifests):
    """True when every manifest and every clip it names exists."""
    for name in manifests:
        if not (out / name).is_file():
            return False
        with open(out / name, encoding="utf-8") as f:
            if not all((out / json.loads(line)["audio"]).is_file() for line in f if line.strip()):
                return False
    return True


def _with_paths(info, out):
    return {**info, "manifests": {s: str(out / m) for s, m in info["manifests"].items()}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory, e.g. data/tiny")
    parser.add_argument("--speakers", type=int, default=8)
    parser.add_argument("--utts_per_speaker", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val_frac", type=float, default=0.15)
    parser.add_argument("--judge_frac", type=float, default=0.25)
    parser.add_argument("--unseen", type=int, default=0, help="the last N voices are held out of training")
    parser.add_argument("--extra_voices", type=int, default=0, help="training-only voices drawn from eSpeak's")
    parser.add_argument("--extra_utts", type=int, default=20, help="clips per extra voice (all train)")
    args = parser.parse_args(argv)
    build_corpus(args.out, args.speakers, args.utts_per_speaker, args.seed, args.val_frac, args.judge_frac,
                 args.unseen, args.extra_voices, args.extra_utts)


if __name__ == "__main__":
    main()
