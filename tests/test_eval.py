"""eval.py: statistics against scipy, WER, the PNG encoder, the LAIONBox protocol shape, sample
generation into sidecars, and the rendered report (parsed: a player per sample, a row per metric,
skipped metrics without numbers). CPU, tiny, a few seconds."""

import argparse
import base64
import binascii
import io
import json
import math
import random
import re
import struct
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from scipy import stats

import audio
import eval as ev
import intervals
import report
from model import PRESETS, AudioDiT

# -----------------------------------------------------------------------------------------------
# statistics and WER


def test_t_quantiles_equal_scipy():
    for df in range(1, 31):
        assert intervals.t95(df) == pytest.approx(stats.t.ppf(0.975, df), abs=6e-4)


def test_mean_ci_and_delta_equal_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(3.5, 0.4, 12), rng.normal(3.2, 0.6, 9)
    n, mean, ci = intervals.mean_ci(a.tolist())
    lo, hi = stats.t.interval(0.95, len(a) - 1, loc=a.mean(), scale=stats.sem(a))
    assert n == 12 and mean == pytest.approx(a.mean()) and ci == pytest.approx((hi - lo) / 2, rel=1e-3)
    d, dci = intervals.delta_ci(a, b)
    res = stats.ttest_ind(a, b, equal_var=False)
    lo, hi = res.confidence_interval(0.95)
    assert d == pytest.approx(a.mean() - b.mean())
    assert dci == pytest.approx((hi - lo) / 2, rel=0.05)  # floor(Welch df) vs scipy's fractional df
    assert math.isnan(intervals.mean_ci([1.0])[2])


@pytest.mark.parametrize("ref,hyp,wer", [
    ("The cat sat.", "the cat sat", 0.0),
    ("the cat sat", "the cat sat on", 1 / 3),  # one insertion
    ("the cat sat on the mat", "the bat sat on mat", 2 / 6),  # substitution + deletion
    ("Don't stop!", "dont stop", 0.0),
    ("hello world", "", 1.0),
])
def test_word_error_rate(ref, hyp, wer):
    assert ev.word_error_rate(ref, hyp) == pytest.approx(wer)


# -----------------------------------------------------------------------------------------------
# images


def _decode_png(data):
    """Minimal PNG reader (8-bit truecolour or indexed colour; filters None and Up) written from
    the spec, to check the encoder; returns (H, W, 3) RGB."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == binascii.crc32(kind + body) & 0xFFFFFFFF
        chunks.setdefault(kind, b"")
        chunks[kind] += body
        pos += 12 + n
    w, h, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert depth == 8 and color in (2, 3) and b"IEND" in chunks
    width = w * (3 if color == 2 else 1)
    raw = zlib.decompress(chunks[b"IDAT"])
    prev, lines = bytearray(width), []
    for y in range(h):
        kind, line = raw[y * (width + 1)], bytearray(raw[y * (width + 1) + 1:(y + 1) * (width + 1)])
        assert kind in (0, 2), f"filter {kind}"
        if kind == 2:  # Up: add the byte above, modulo 256
            line = bytearray((a + b) % 256 for a, b in zip(line, prev))
        lines.append(bytes(line))
        prev = line
    pixels = np.frombuffer(b"".join(lines), dtype=np.uint8)
    if color == 2:
        return pixels.reshape(h, w, 3)
    palette = np.frombuffer(chunks[b"PLTE"], dtype=np.uint8).reshape(-1, 3)
    assert pixels.max() < len(palette)
    return palette[pixels.reshape(h, w)]


def test_png_encoder_roundtrip():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    assert np.array_equal(_decode_png(report.png_bytes(img)), img)
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    index = rng.integers(0, 16, (6, 9), dtype=np.uint8)
    assert np.array_equal(_decode_png(report.png_bytes(index, palette)), palette[index])


def test_spectrogram_shows_the_tone():
    t = torch.arange(16000) / 16000
    png = _decode_png(report.spectrogram_png(torch.sin(2 * math.pi * 2000 * t), height=64, max_width=40))
    assert png.shape == (64, 40, 3)
    brightness = png.astype(float).sum(axis=(1, 2))
    assert abs(int(brightness.argmax()) - (64 - 1 - 2000 / 8000 * 64)) <= 2  # 2 kHz row, low at the bottom
    assert len({tuple(c) for c in png.reshape(-1, 3)}) <= report.SPECTROGRAM_LEVELS


def test_nice_ticks():
    assert report.nice_ticks(0, 450) == [0, 100, 200, 300, 400, 500]
    assert report.nice_ticks(0.93, 2.7) == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    assert report.nice_ticks(3, 4) == pytest.approx([3.0, 3.2, 3.4, 3.6, 3.8, 4.0])


def test_loss_curves_have_axes_and_validation_points():
    """A line for the training loss, a dot for each validation point (one here: a line of one point
    draws nothing), tick labels on both axes, and every point inside the plot at its coordinates."""
    records = [{"step": s, "loss": 2.0 - s / 100} for s in range(0, 451, 25)] + [{"step": 450, "val_loss": 1.2}]
    svg = report.loss_curves_svg(records)
    assert svg.startswith("<svg") and svg.count("<polyline") == 1
    dots = re.findall(r'<circle class="point" data-key="(\w+)" cx="([\d.]+)" cy="([\d.]+)"', svg)
    assert [d[0] for d in dots].count("val_loss") == 1 and "val_loss (1 points)" in svg
    xticks = re.findall(r'<line class="xtick" x1="([\d.]+)"[^>]*/><text[^>]*>([^<]+)</text>', svg)
    yticks = re.findall(r'<line class="ytick"[^>]*y1="([\d.]+)"[^>]*/><text[^>]*>([^<]+)</text>', svg)
    assert [t[1] for t in xticks] == ["0", "100", "200", "300", "400", "500"]
    assert len(yticks) >= 3 and ">step</text>" in svg
    # the validation dot sits where its tick labels say: x between the 400 and 500 ticks, y on the 1.2 line
    (x400, _), (x500, _) = xticks[4], xticks[5]
    _, vx, vy = next(d for d in dots if d[0] == "val_loss")
    assert float(vx) == pytest.approx(float(x400) + 0.5 * (float(x500) - float(x400)), abs=0.2)
    y_of = {float(label): float(y) for y, label in yticks}
    lo, hi = max(v for v in y_of if v <= 1.2), min(v for v in y_of if v >= 1.2)
    expect = y_of[lo] if hi == lo else y_of[lo] + (1.2 - lo) / (hi - lo) * (y_of[hi] - y_of[lo])
    assert float(vy) == pytest.approx(expect, abs=0.2)


# -----------------------------------------------------------------------------------------------
# the report


def _voice(seconds, f0, seed, sr=16000):
    """A voiced, syllable-modulated harmonic signal (a stand-in for speech)."""
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(seed)
    wav = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6)) / k for k in range(1, 12))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) ** 2
    return (0.1 * wav * envelope).astype(np.float32)


def _write_sample(path, wav, sr, **meta):
    sf.write(path, wav, sr)
    path.with_suffix(".json").write_text(json.dumps(meta))


@pytest.fixture()
def sample_dirs(tmp_path):
    refs = tmp_path / "refs"
    refs.mkdir()
    sf.write(refs / "alice.wav", _voice(3, 180, 0), 16000)
    dirs = []
    for variant, f0 in (("base", 120), ("adaln", 170)):
        d = tmp_path / variant / "samples"
        d.mkdir(parents=True)
        for seed in (1, 2):
            # 2.4 s: DNSMOS repeats it to 9.6 s, one 9.01 s window (fast)
            _write_sample(d / f"000_seed{seed}.wav", np.stack([_voice(2.4, f0, seed)] * 2, 1), 48000,
                          prompt="A woman says 'hello there my friend, how are you?'", seed=seed,
                          ref=str(refs / "alice.wav"), speaker="alice")
        dirs.append(str(d))
    return dirs


class ReportParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.players, self.refs, self.audio, self.metric_rows, self.images, self.svgs = [], [], {}, {}, 0, 0
        self._row, self._text = None, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "audio" and "data-sample" in a:
            assert a["src"].startswith("data:audio/ogg;base64,")
            self.players.append(a["data-sample"])
            self.audio[a["data-sample"]] = a["src"]
        if tag == "audio" and "data-ref" in a:
            self.refs.append(a["data-ref"])
            self.audio[a["data-ref"]] = a["src"]
        if tag == "img":
            assert a["src"].startswith("data:image/png;base64,")
            self.images += 1
        if tag == "svg":
            self.svgs += 1
        if tag == "tr" and "data-metric" in a:
            self._row, self._text = a["data-metric"], []

    def handle_data(self, data):
        if self._row is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "tr" and self._row is not None:
            self.metric_rows.setdefault(self._row, []).append("".join(self._text))
            self._row = None


def _args(**kw):
    base = dict(wavlm="", whisper="", utmos="", aesthetics="", judge="", asr="", ge2e_split="", dnsmos_windows=0,
                dnsmos_per_variant=0)
    base.update(kw)
    return argparse.Namespace(**base)


def test_report_renders_every_sample_and_metric(sample_dirs, tmp_path):
    samples = ev.load_samples(sample_dirs)
    assert {s["variant"] for s in samples} == {"base", "adaln"} and len(samples) == 4
    groups = [g for g in ev.METRIC_GROUPS if g != "dnsmos"]  # DNSMOS (slow on CPU): its own test below
    table, skipped = ev.score_samples(samples, _args(utmos=str(tmp_path / "nope.pt")), groups=groups)
    assert "no weights given (--wavlm PATH)" in skipped["spk_sim"]
    assert "weights not found" in skipped["utmos"]
    for m in ("spk_sim", "wer", "utmos", "aes_pq", "judge_acc"):
        assert m in skipped and m not in table  # absent weights: a reason, never a number
    assert skipped["dnsmos_ovr"] == "not requested (--metrics)"
    with pytest.raises(ValueError, match="--metrics"):
        ev.score_samples(samples, _args(), groups=["mos"])
    # the judge hook: per-sample numbers from elsewhere render like any metric
    ev.add_metric_rows(table, "judge_margin", {s["id"]: 0.1 * i for i, s in enumerate(samples)})
    skipped.pop("judge_margin")
    ev.add_metric_rows(table, "custom", {samples[0]["id"]: float("nan"), samples[1]["id"]: 2.0}, "a custom score")
    assert table["custom"] == {samples[1]["id"]: 2.0}

    curves = {"adaln": [{"step": i, "loss": 1.0 / (i + 1)} for i in range(5)]}
    page = report.render_html(samples, table, skipped, metric_info=ev.METRIC_INFO, baseline="base", curves=curves)
    p = ReportParser()
    p.feed(page)
    assert sorted(p.players) == sorted(s["id"] for s in samples)  # a player for every sample
    assert p.refs == [samples[0]["meta"]["ref"]]  # the one reference, once
    assert p.images == len(samples) + 1 and p.svgs == 1
    for m in list(table) + list(skipped):
        assert m in p.metric_rows, f"no row for metric {m}"
    for m, reason in skipped.items():
        (text,) = p.metric_rows[m]
        desc = ev.METRIC_INFO.get(m, ("",))[0]
        assert text == f"{m}{desc}skipped: {reason}"  # the reason and nothing else: no number
    summary_row, delta_row = p.metric_rows["judge_margin"]
    base_vals = [table["judge_margin"][s["id"]] for s in samples if s["variant"] == "base"]
    assert f"{np.mean(base_vals):.3f}" in summary_row and "n=2" in summary_row
    assert "+" in delta_row or "-" in delta_row or "−" in delta_row
    assert not re.search(r"(src|href)\s*=\s*['\"](?!data:|#)", page)  # self-contained: nothing to fetch


def test_report_main_writes_one_file(sample_dirs, tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text("\n".join(json.dumps({"step": i, "loss": 2.0 - i / 10}) for i in range(6)))
    out = tmp_path / "report.html"
    ev.main(["--samples", *sample_dirs, "--baseline", "base", "--out", str(out), "--metrics_jsonl", str(log),
             "--scores", str(tmp_path / "scores.json"), "--metrics", "spk_sim,judge"])  # DNSMOS: the test above
    page = out.read_text()
    assert page.count("<audio controls data-sample=") == 4 and "<polyline" in page
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert "spk_sim" in scores["skipped"]


SPEECH = Path(__file__).parent / "data" / "speech_16k.wav"  # 5.05 s of eSpeak NG speech


def _speech_samples(tmp_path, n, seconds=4.0):
    """n samples of `seconds` of real (eSpeak) speech in two variants, sharing one reference."""
    speech, rate = sf.read(SPEECH, dtype="float32")
    sf.write(tmp_path / "ref.wav", speech[:rate * 3], rate)
    for k in range(n):
        d = tmp_path / ("a" if k % 2 else "b")
        d.mkdir(exist_ok=True)
        start = (k * 1000) % (len(speech) - int(seconds * rate))
        _write_sample(d / f"{k:04d}.wav", speech[start:start + int(seconds * rate)], rate, prompt="p", seed=k,
                      ref=str(tmp_path / "ref.wav"), speaker="s")
    return ev.load_samples([str(tmp_path / "a"), str(tmp_path / "b")])


def test_report_embeds_opus_and_stays_under_10_mb_at_384_samples(tmp_path):
    """The tiny pipeline's report holds 384 samples of 1-4 s (40 corpus clips: mean 1.9 s, 90% under
    2.6 s). Players are Ogg Opus that decode to the clip's length, the reference is embedded once,
    and the page grows by so little per sample that 384 clips of 2.5 s at 16 kHz stay under 10 MB
    (measured: 9.2 MB; 7.0 MB at 1.9 s); the WAV files as they are would not."""
    samples = _speech_samples(tmp_path, 8, seconds=2.5)
    pages = {rate: [report.render_html(samples[:n], {}, {}, player_rate=rate) for n in (4, 8)] for rate in (16000, 0)}
    size = {rate: len(big) + (384 - 8) * (len(big) - len(small)) / 4 for rate, (small, big) in pages.items()}
    assert size[16000] <= 10e6 < size[0], size
    p = ReportParser()
    p.feed(pages[16000][1])
    assert len(p.players) == 8 and len(p.refs) == 1
    for sid in p.players[:2] + p.refs:
        wav, rate = sf.read(io.BytesIO(base64.b64decode(p.audio[sid].split(",", 1)[1])))
        want = sf.info(samples[0]["path"] if sid in p.players else p.refs[0]).duration
        assert rate == 16000 and abs(len(wav) / rate - want) < 0.03 and np.abs(wav).max() > 0.1


def test_player_rate_must_be_an_opus_rate(sample_dirs, tmp_path):
    with pytest.raises(SystemExit, match="Opus"):
        ev.main(["--samples", *sample_dirs, "--player_rate", "22050", "--metrics", "judge",
                 "--out", str(tmp_path / "r.html")])
    with pytest.raises(ValueError, match="Opus"):
        report.audio_data_uri(str(SPEECH), 44100)


def test_dnsmos_on_a_spread_subset_and_one_window(tmp_path):
    """--dnsmos_per_variant picks evenly spread samples of each variant; --dnsmos_windows 1 scores
    the first 9.01 s window only, equal to dnsmos.py's own max_windows=1."""
    from dnsmos import DNSMOS

    samples = _speech_samples(tmp_path, 8, seconds=1.5)  # 1.5 s is repeated to 12 s: 3 windows
    picked = ev.spread_subset(samples, 2)
    assert [s["id"] for s in picked] == ["a/0001", "a/0007", "b/0000", "b/0006"]
    assert ev.spread_subset(samples, 0) == samples and len(ev.spread_subset(samples, 9)) == 8
    table, skipped = ev.score_samples(samples, _args(dnsmos_windows=1, dnsmos_per_variant=1), groups=["dnsmos"])
    assert set(table["dnsmos_ovr"]) == {"a/0001", "b/0000"} and "dnsmos_ovr" not in skipped
    assert samples[0]["id"] == "a/0001"
    with torch.no_grad():
        want = DNSMOS()(audio.read_mono16k(samples[0]["path"])[None], max_windows=1)
    assert table["dnsmos_ovr"]["a/0001"] == pytest.approx(float(want["ovr"][0]), abs=1e-5)


def test_dnsmos_scores_identical_audio_once(tmp_path, monkeypatch):
    """A baseline that never hears the reference writes the same clip for every voice: DNSMOS runs
    once per distinct clip and every copy gets its score."""
    import dnsmos

    samples = _speech_samples(tmp_path, 4, seconds=1.5)  # b/0000, a/0001, b/0002, a/0003: four clips
    wavs = {s["id"]: audio.read_mono16k(s["path"]) for s in samples}
    wavs["b/0002"] = wavs["b/0000"].clone()  # the same audio under another name
    rows = []
    forward = dnsmos.DNSMOS.forward
    monkeypatch.setattr(dnsmos.DNSMOS, "forward", lambda self, x, **kw: rows.append(len(x)) or forward(self, x, **kw))
    table = ev.metric_dnsmos(samples, wavs, torch.device("cpu"), max_windows=1)
    assert sum(rows) == 3 and set(table["dnsmos_ovr"]) == set(wavs)
    assert table["dnsmos_ovr"]["b/0002"] == table["dnsmos_ovr"]["b/0000"] != table["dnsmos_ovr"]["a/0001"]


def _tone(f0, seconds=1.5, noise=0.0, seed=0, sr=16000):
    """A steady harmonic complex at f0 (amplitudes 0.7^k, like a voice's source) plus white noise."""
    t = np.arange(int(seconds * sr)) / sr
    wav = sum(0.7 ** k * np.sin(2 * np.pi * k * f0 * t + k) for k in range(1, 20) if k * f0 < sr / 2)
    return (0.5 * wav / np.abs(wav).max() + noise * np.random.default_rng(seed).standard_normal(len(t))).astype(np.float32)


@pytest.mark.parametrize("f0", [65.0, 116.0, 130.0, 255.0, 380.0])
def test_pitch_track_finds_the_pitch_of_tones_and_none_in_noise(f0):
    """Every frame of a harmonic tone (low or high, clean or with white noise at ~6 dB SNR) is voiced
    at its pitch, within 5 % (neither an octave below, where the autocorrelation peaks as high, nor
    above), the median within 0.1 % (1 % with the noise: 0.17 semitones); white noise has no voiced
    frame."""
    for noise in (0.0, 0.1):
        voiced, pitch = ev.pitch_track(torch.from_numpy(_tone(f0, noise=noise)))
        assert len(voiced) > 100 and bool(voiced.all())
        assert pitch.min().item() > 0.95 * f0 and pitch.max().item() < 1.05 * f0
        assert pitch.median().item() == pytest.approx(f0, rel=1e-2 if noise else 1e-3)
    share, median = ev.pitch_summary(torch.from_numpy(_tone(f0, noise=1.0, seed=int(f0)) - _tone(f0)))
    assert share < 0.05 and (median == 0.0 or share > 0)
    # silence around a tone is not scored: the share is of the loud frames
    padded = np.concatenate([np.zeros(8000, np.float32), _tone(f0), np.zeros(8000, np.float32)])
    assert ev.pitch_summary(torch.from_numpy(padded))[0] > 0.95


def test_pitch_rows_compare_each_sample_with_its_reference(tmp_path):
    """voiced_vs_ref is the sample's voiced share minus its reference's; pitch_st the semitones
    between their median pitches, only where both are voiced; a noise sample of a voiced reference
    loses its whole voiced share and has no pitch_st."""
    for name, wav in {"low": _tone(116.0), "high": _tone(232.0), "noise": _tone(116.0, noise=1.0) - _tone(116.0)}.items():
        sf.write(tmp_path / f"{name}.wav", wav, 16000)
    d = tmp_path / "v"
    d.mkdir()
    for k, (src, ref) in enumerate([("high", "low"), ("low", "low"), ("noise", "low"), ("low", None)]):
        wav, _ = sf.read(tmp_path / f"{src}.wav", dtype="float32")
        _write_sample(d / f"{k}.wav", wav, 16000, prompt="p", seed=k,
                      **({"ref": str(tmp_path / f"{ref}.wav")} if ref else {}))
    samples = ev.load_samples([str(d)])
    table, skipped = ev.score_samples(samples, _args(), groups=["pitch"])
    assert not {"voiced", "voiced_vs_ref", "pitch_st"} & set(skipped)
    assert table["pitch_st"]["v/0"] == pytest.approx(12.0, abs=0.05) and table["pitch_st"]["v/1"] == pytest.approx(0.0, abs=1e-6)
    assert set(table["pitch_st"]) == {"v/0", "v/1"}  # noise has no pitch; v/3 has no reference
    assert table["voiced_vs_ref"]["v/1"] == 0.0 and table["voiced_vs_ref"]["v/2"] < -0.95
    assert set(table["voiced_vs_ref"]) == {"v/0", "v/1", "v/2"} and len(table["voiced"]) == 4
    assert table["voiced"]["v/3"] == 1.0
    (d / "2.json").write_text(json.dumps({"prompt": "p", "seed": 2, "ref": str(tmp_path / "gone.wav")}))
    with pytest.raises(FileNotFoundError, match="gone.wav"):
        ev.score_samples(ev.load_samples([str(d)]), _args(), groups=["pitch"])


def _espeak_corpus(root, voices, per_voice, seed):
    """A manifest of eSpeak clips (corpus.py's engine), like the corpus's judge split."""
    import corpus

    engine = corpus.Espeak.get()
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, voice in voices.items():
        for k in range(per_voice):
            text = corpus.sentence(rng)
            wav = corpus.resample(engine.synth(text, *voice, seed=seed * 100 + k), engine.rate, 16000)
            sf.write(root / f"{name}_{k}.wav", wav, 16000)
            rows.append({"audio": f"{name}_{k}.wav", "text": text, "speaker": name})
    (root / "split.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "split.jsonl", rows


def test_ge2e_rows_equal_voice_encoder(tmp_path):
    """ge2e_sim is the cosine of a sample's and its reference's embeddings (1 for a sample that is
    its reference); with --ge2e_split the per-variant means of ge2e_acc / ge2e_margin equal
    voice_encoder.identify against that split's centroids; without it they are skipped, named."""
    import judge as judge_lib
    import voice_encoder as ve

    voices = {"deep": ("en-us+m1", 30, 40, 150), "bright": ("en+f2", 75, 70, 175)}
    split, _ = _espeak_corpus(tmp_path / "judge", voices, 3, seed=1)
    _, rows = _espeak_corpus(tmp_path / "gen", voices, 2, seed=2)
    (tmp_path / "v").mkdir()
    for k, r in enumerate(rows):  # "samples": new utterances of both voices, the deep voice as reference
        wav, rate = sf.read(tmp_path / "gen" / r["audio"], dtype="float32")
        _write_sample(tmp_path / "v" / f"{k}.wav", wav, rate, prompt=r["text"], seed=k, speaker=r["speaker"],
                      ref=str(tmp_path / "gen" / rows[0]["audio"]))
    samples = ev.load_samples([str(tmp_path / "v")])
    table, skipped = ev.score_samples(samples, _args(), groups=["ge2e"])
    assert set(skipped) >= {"ge2e_acc", "ge2e_margin"} and "--ge2e_split" in skipped["ge2e_acc"]
    assert table["ge2e_sim"]["v/0"] == pytest.approx(1.0, abs=1e-5)  # sample 0 is its own reference
    assert all(v < 0.999 for k, v in table["ge2e_sim"].items() if k != "v/0")
    table, skipped = ev.score_samples(samples, _args(ge2e_split=str(split)), groups=["ge2e"])
    assert not {"ge2e_sim", "ge2e_acc", "ge2e_margin"} & set(skipped)
    enc = ve.load_encoder()
    clips, speakers = judge_lib.load_split(split)
    want = ve.identify(ve.embed(enc, [audio.read_mono16k(s["path"]) for s in samples]),
                       [s["meta"]["speaker"] for s in samples], ve.centroids_from_clips(ve.embed(enc, clips), speakers))
    assert np.mean(list(table["ge2e_acc"].values())) == pytest.approx(want["accuracy"])
    assert np.mean(list(table["ge2e_margin"].values())) == pytest.approx(want["margin"], abs=1e-6)
    assert want["accuracy"] == 1.0 and want["margin"] > 0.1  # two clearly different eSpeak voices


def test_ge2e_skipped_without_the_package(sample_dirs, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "resemblyzer" else real(name, *a))
    table, skipped = ev.score_samples(ev.load_samples(sample_dirs), _args(), groups=["ge2e"])
    assert "ge2e_sim" not in table and "resemblyzer" in skipped["ge2e_sim"]


def _tiny_whisper(path):
    """A randomly initialised 1-layer Whisper with a byte-level vocabulary, saved like a real one."""
    from transformers import (WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration,
                              WhisperProcessor, WhisperTokenizer)
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    path.mkdir()
    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|transcribe|>", "<|notimestamps|>"]
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    vocab.update({s: len(vocab) + i for i, s in enumerate(specials)})
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    eot = specials[0]
    tok = WhisperTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), unk_token=eot, bos_token=eot,
                           eos_token=eot, pad_token=eot)
    tok.add_special_tokens({"additional_special_tokens": specials[1:]})
    WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tok).save_pretrained(path)
    ids = tok.convert_tokens_to_ids(specials)
    cfg = WhisperConfig(vocab_size=len(tok), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_target_positions=32,
                        pad_token_id=ids[0], bos_token_id=ids[0], eos_token_id=ids[0], decoder_start_token_id=ids[1])
    torch.manual_seed(0)
    WhisperForConditionalGeneration(cfg).save_pretrained(path)


def test_wer_with_a_local_whisper(sample_dirs, tmp_path):
    _tiny_whisper(tmp_path / "whisper")
    samples = ev.load_samples(sample_dirs[:1])
    table, skipped = ev.score_samples(samples, _args(whisper=str(tmp_path / "whisper")), groups=["wer"])
    assert skipped["dnsmos_ovr"] == "not requested (--metrics)"
    assert "wer" not in skipped and set(table["wer"]) == {s["id"] for s in samples}
    assert all(v >= 0 and math.isfinite(v) for v in table["wer"].values())


def test_spk_sim_with_a_local_wavlm(sample_dirs, tmp_path):
    """spk_sim through speaker.py's WavLM-SV loader on a tiny random WavLMForXVector saved locally:
    a sample that IS its reference scores cosine 1, the others less."""
    from transformers import Wav2Vec2FeatureExtractor, WavLMConfig, WavLMForXVector

    cfg = WavLMConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                      conv_dim=(8, 8), conv_stride=(5, 4), conv_kernel=(10, 8), num_feat_extract_layers=2,
                      tdnn_dim=(8, 8), tdnn_kernel=(3, 1), tdnn_dilation=(1, 1), xvector_output_dim=8,
                      num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, num_buckets=8)
    torch.manual_seed(0)
    WavLMForXVector(cfg).save_pretrained(tmp_path / "wavlm")
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True).save_pretrained(tmp_path / "wavlm")
    samples = ev.load_samples(sample_dirs)
    twin = samples[0]
    sf.write(twin["path"], sf.read(twin["meta"]["ref"])[0], 16000)  # this sample is its own reference
    table, skipped = ev.score_samples(samples, _args(wavlm=str(tmp_path / "wavlm")), groups=["spk_sim"])
    sims = table["spk_sim"]
    assert "spk_sim" not in skipped and set(sims) == {s["id"] for s in samples}
    assert sims[twin["id"]] == pytest.approx(1.0, abs=1e-5)
    assert all(-1 <= v < 0.9999 for k, v in sims.items() if k != twin["id"])


def test_judge_rows_average_to_judge_report(sample_dirs, tmp_path):
    """judge_acc / judge_margin per sample, whose means per variant equal judge.py's own report."""
    import judge as judge_lib

    clips = [torch.from_numpy(_voice(2, f0, seed)) for f0 in (180, 100) for seed in range(4)]
    judge = judge_lib.train_judge(clips, ["alice"] * 4 + ["bob"] * 4, steps=50)
    judge_lib.save_judge(judge, tmp_path / "judge.safetensors")
    samples = ev.load_samples(sample_dirs)
    table, skipped = ev.score_samples(samples, _args(judge=str(tmp_path / "judge.safetensors")), groups=["judge"])
    assert set(table["judge_acc"]) == {s["id"] for s in samples} and set(table["judge_acc"].values()) <= {0.0, 1.0}
    for variant in ("base", "adaln"):
        mine = [s for s in samples if s["variant"] == variant]
        want = judge_lib.judge_report(judge_lib.load_judge(tmp_path / "judge.safetensors"),
                                      [audio.read_mono16k(s["path"]) for s in mine], ["alice"] * len(mine))
        assert np.mean([table["judge_acc"][s["id"]] for s in mine]) == pytest.approx(want["accuracy"])
        assert np.mean([table["judge_margin"][s["id"]] for s in mine]) == pytest.approx(want["margin"], abs=1e-6)


def test_dnsmos_clean_speech_above_noisy(tmp_path):
    """eval.py's DNSMOS rows: real (eSpeak) speech scores higher than the same speech + noise."""
    from pathlib import Path

    speech, rate = sf.read(Path(__file__).parent / "data" / "speech_16k.wav", dtype="float32")
    noisy = speech + 0.1 * np.random.default_rng(0).standard_normal(len(speech)).astype(np.float32)
    for name, wav in (("clean", speech), ("noisy", noisy)):
        _write_sample(tmp_path / f"{name}.wav", wav, rate, prompt="x", seed=0)
    samples = ev.load_samples([str(tmp_path)])
    table, skipped = ev.score_samples(samples, _args(), groups=["dnsmos"])  # no weights to fetch: always runs
    clean, noisy = (f"{tmp_path.name}/{n}" for n in ("clean", "noisy"))
    for k in ("dnsmos_bak", "dnsmos_ovr"):
        assert table[k][clean] > table[k][noisy] + 0.3, table
    assert 1.0 < table["dnsmos_ovr"][clean] < 5.0 and not any(k.startswith("dnsmos") for k in skipped)


# -----------------------------------------------------------------------------------------------
# the LAIONBox protocol


def _eval_yaml(tmp_path, n_prompts=6, n_speakers=5):
    refs = []
    for i in range(n_speakers):
        path = tmp_path / f"spk{i}.wav"
        sf.write(path, _voice(2, 100 + 20 * i, i), 16000)
        refs.append(path.name)
    lines = ["prompts:"] + [f"  - \"Speaker {i}: 'line number {i} is spoken here.'\"" for i in range(n_prompts)]
    lines += ["speakers:"] + [f"  s{i}: {r}" for i, r in enumerate(refs)] + ["seeds: [42, 123]", "unconditioned: true"]
    path = tmp_path / "laionbox.yaml"
    path.write_text("\n".join(lines))
    return path


def test_laionbox_protocol_shape(tmp_path):
    spec = ev.read_eval_set(_eval_yaml(tmp_path))
    items = ev.laionbox_items(spec)
    cond = [it for it in items if it["ref"]]
    assert len(cond) == 6 * 5 * 2 and len(items) - len(cond) == 6 * 2  # 60 + 12 unconditioned
    assert len({(it["prompt"], it["speaker"], it["seed"]) for it in items}) == len(items)
    bad = tmp_path / "bad.yaml"
    bad.write_text("prompts: [a]\nseeds: [1]\nspeakers: {x: missing.wav}\n")
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        ev.read_eval_set(bad)
    bad.write_text("prompts: [a]\nseeds: [1]\nspeaker: {}\n")
    with pytest.raises(KeyError, match="speaker"):
        ev.read_eval_set(bad)


class FakeCodec(torch.nn.Module):
    """Test double for codec.py: 640 samples @ 16 kHz per latent, mono."""

    sample_rate = output_rate = 16000
    channels = 1

    def encode(self, wav):
        B, C, N = wav.shape
        return wav[..., : N // 640 * 640].reshape(B, C, -1, 640)[..., :16].mean(1)

    def decode(self, lat):
        return lat.repeat_interleave(40, dim=-1).flatten(1).tanh()[:, None]


class FakeText:
    """Test double for text.py: prompt bytes as features."""

    def encode(self, prompts):
        feats = torch.zeros(len(prompts), 4, 32)
        for i, p in enumerate(prompts):
            feats[i, :, : min(32, len(p))] = torch.tensor(list(p.encode()[:32]), dtype=torch.float32)[None] / 255
        return feats, torch.ones(len(prompts), 4, dtype=torch.bool)


def test_generate_eval_set_writes_sidecars(tmp_path):
    torch.manual_seed(0)
    model = AudioDiT(PRESETS["micro"]).eval()
    spec = ev.read_eval_set(_eval_yaml(tmp_path, n_prompts=2, n_speakers=2))
    spec["seeds"] = [7]
    pipeline = (model, FakeCodec(), FakeText(), lambda f, m: f, None, None)
    kwargs = dict(steps=1, cfg=2.0, stg=0.0, rescale=0.0, duration=0.2, ref_mode="tokens", progress=False)
    paths = ev.generate_eval_set(ev.laionbox_items(spec), pipeline, str(tmp_path / "out" / "v1"), variant="v1",
                                 settings={"ckpt": "x"}, sample_kwargs=kwargs)
    assert len(paths) == 2 * 2 + 2
    samples = ev.load_samples([str(tmp_path / "out")])
    assert len(samples) == 6 and {s["variant"] for s in samples} == {"v1"}
    metas = [s["meta"] for s in samples]
    assert sum(m["ref"] is None for m in metas) == 2 and all(m["ref_mode"] == "none" for m in metas if not m["ref"])
    assert all(m["ckpt"] == "x" and m["spoken_text"] for m in metas)


def test_eval_set_laionbox_end_to_end(tmp_path):
    """eval.py --eval_set laionbox: sample prompts x speakers x seeds (+ unconditioned) with a micro
    DiT through sample.py's loader, then score and render them."""
    from model import save_dit

    torch.manual_seed(0)
    save_dit(AudioDiT(PRESETS["micro"]), str(tmp_path / "dit.safetensors"))
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: micro\ncodec: mel\nmel_n_mels: 4\ntext_encoder: byte\nmax_text_len: 32\n"
                   "speaker_extractors: []\n")
    spec = _eval_yaml(tmp_path, n_prompts=2, n_speakers=2)
    out = tmp_path / "report.html"
    ev.main(["--eval_set", "laionbox", "--eval_yaml", str(spec), "--variant", "micro", "--samples_dir",
             str(tmp_path / "gen"), "--ckpt", str(tmp_path / "dit.safetensors"), "--config", str(cfg),
             "--ref_mode", "tokens", "--steps", "1", "--duration", "0.2", "--device", "cpu", "--metrics", "judge",
             "--out", str(out)])
    wavs = sorted((tmp_path / "gen" / "micro").glob("*.wav"))
    assert len(wavs) == 2 * 2 * 2 + 2 * 2  # prompts x speakers x seeds + prompts x seeds unconditioned
    p = ReportParser()
    p.feed(out.read_text())
    assert len(p.players) == len(wavs) and "judge_acc" in p.metric_rows
