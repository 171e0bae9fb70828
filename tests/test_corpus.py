"""corpus.py: a microscopic eSpeak NG corpus is built in seconds, has valid manifests and audio,
voices that are told apart by a plain spectral statistic, and is cached by its settings."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import corpus
import data

MANIFEST_KEYS = {"audio", "text", "speaker", "ref_audio", "source", "id"}  # data.py's format


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    return out, corpus.build_corpus(out, speakers=8, utts_per_speaker=4, seed=0, verbose=False)


def rows_of(info, split):
    with open(info["manifests"][split]) as f:
        return [json.loads(line) for line in f]


def test_manifests(tiny):
    out, info = tiny
    assert set(info["manifests"]) == {"train", "val", "judge", "val_unseen", "judge_unseen", "base"}
    assert rows_of(info, "val_unseen") == rows_of(info, "judge_unseen") == []  # no held-out voice asked for
    ids = []
    for split in ("train", "val", "judge"):
        rows = rows_of(info, split)
        assert len(rows) == 8 * {"train": 2, "val": 1, "judge": 1}[split]  # 4 utts: 2/1/1 each
        for row in rows:
            assert set(row) <= MANIFEST_KEYS and {"audio", "text", "speaker", "source"} <= set(row)
            assert not os.path.isabs(row["audio"]) and (out / row["audio"]).is_file()
            assert row["source"] == "espeak"
            # prompt = one description for all speakers (text must not give the voice away)
            # + the spoken line in double quotes
            spoken = row["text"].split('"')[1]
            assert row["text"] == f'{corpus.DESCRIPTION} "{spoken}"'
            assert 4 <= len(spoken.split()) <= 8
            ids.append(row["id"])
        assert sorted({r["speaker"] for r in rows}) == [f"spk{k:02d}" for k in range(8)]
    assert len(ids) == len(set(ids)) == info["utterances"] == 32  # split by utterance, no overlap
    # transcripts.tsv keeps the raw spoken line of each id
    lines = (out / "transcripts.tsv").read_text().splitlines()[1:]
    by_id = {line.split("\t")[0]: line.split("\t")[3] for line in lines}
    for row in rows_of(info, "val"):
        assert row["text"].endswith(f'"{by_id[row["id"]]}"')


def test_base_manifest_describes_each_voice(tiny):
    """base.jsonl (the base DiT's training set) is train.jsonl with every clip a second time, under
    its own voice's description; nothing else (no val or judge clip, no other wording)."""
    _, info = tiny
    train, base = rows_of(info, "train"), rows_of(info, "base")
    assert base[0::2] == train  # the shared-description rows, as in train.jsonl
    descriptions = {f"spk{k:02d}": v[4] for k, v in enumerate(corpus.VOICES)}
    assert len(set(descriptions.values())) == len(descriptions)  # a description names one voice
    for shared, described in zip(base[0::2], base[1::2]):
        spoken = shared["text"].split('"')[1]
        assert described == {**shared, "id": shared["id"] + "_described",
                             "text": f'{descriptions[shared["speaker"]]} "{spoken}"'}
    assert len({r["id"] for r in base}) == len(base)


def test_manifest_reads_with_data_py(tiny):
    """The trainer's own reader is the reference for the manifest format."""
    _, info = tiny
    items = data.read_manifest(info["manifests"]["train"])
    assert len(items) == 16 and all(os.path.isfile(i.audio) and i.speaker for i in items)


def test_audio(tiny):
    out, info = tiny
    for split in ("train", "val", "judge"):
        for row in rows_of(info, split):
            wav, sr = sf.read(out / row["audio"], dtype="float32")
            assert sr == 16000 and wav.ndim == 1
            assert corpus.MIN_SECONDS <= len(wav) / sr <= corpus.MAX_SECONDS
            assert np.sqrt(np.mean(wav ** 2)) > 0.02  # speech, not silence
            assert 0.5 < np.abs(wav).max() <= 1.0


def log_spectrum(wav):
    """Long-term average log power spectrum (257 bins) of a clip: a text-independent voice print."""
    frames = np.lib.stride_tricks.sliding_window_view(wav, 512)[::160] * np.hanning(512)
    power = (np.abs(np.fft.rfft(frames, axis=1)) ** 2).mean(0)
    return np.log(power + 1e-8)


def test_voices_are_distinct(tiny):
    """Leave-one-out nearest speaker centroid of the long-term spectrum finds each clip's own
    speaker far above chance (1/8), with 3 other clips per speaker as the only 'training'."""
    out, info = tiny
    rows = [r for s in ("train", "val", "judge") for r in rows_of(info, s)]
    prints = np.stack([log_spectrum(sf.read(out / r["audio"], dtype="float32")[0]) for r in rows])
    speakers = np.array([r["speaker"] for r in rows])
    names = sorted(set(speakers))
    hits = []
    for i in range(len(rows)):
        rest = np.arange(len(rows)) != i
        centroids = np.stack([prints[rest & (speakers == s)].mean(0) for s in names])
        hits.append(names[np.linalg.norm(centroids - prints[i], axis=1).argmin()] == speakers[i])
    assert np.mean(hits) >= 0.85


def test_cache(tiny, tmp_path):
    out, info = tiny
    wav = out / rows_of(info, "train")[0]["audio"]
    stamp = wav.stat().st_mtime_ns
    again = corpus.build_corpus(out, speakers=8, utts_per_speaker=4, seed=0, verbose=False)
    assert again["hash"] == info["hash"] and wav.stat().st_mtime_ns == stamp  # nothing rewritten
    first = corpus.build_corpus(tmp_path, speakers=2, utts_per_speaker=3, seed=0, verbose=False)
    other = corpus.build_corpus(tmp_path, speakers=2, utts_per_speaker=3, seed=1, verbose=False)
    assert other["hash"] != first["hash"]  # new settings: rebuilt
    # a deleted clip makes the cache incomplete: rebuilt, not trusted
    clip = tmp_path / rows_of(other, "val")[0]["audio"]
    clip.unlink()
    corpus.build_corpus(tmp_path, speakers=2, utts_per_speaker=3, seed=1, verbose=False)
    assert clip.is_file()


def test_deterministic(tmp_path):
    """The same settings give the same corpus file for file, breathy voices' noise included.
    (eSpeak keeps some synthesis state between utterances, so this holds per fresh process.)"""
    def build(name, seed):
        subprocess.run([sys.executable, "corpus.py", "--out", str(tmp_path / name), "--speakers", "8",
                        "--utts_per_speaker", "3", "--seed", str(seed)], check=True,
                       cwd=Path(corpus.__file__).parent, capture_output=True)
        return {p.relative_to(tmp_path / name): p.read_bytes()
                for p in sorted((tmp_path / name).rglob("*")) if p.is_file() and p.name != "corpus.json"}
    a, b, c = build("a", 0), build("b", 0), build("c", 1)
    assert len(a) == 8 * 3 + 7 and a == b  # clips + 6 manifests + transcripts.tsv
    assert a[Path("transcripts.tsv")] != c[Path("transcripts.tsv")]


def test_resample_matches_analytic_sine():
    t22, t16 = np.arange(22050) / 22050, np.arange(16000) / 16000
    tone = lambda t: np.sin(2 * np.pi * 1000 * t) * np.hanning(len(t))  # 1 s, 1 kHz, windowed
    np.testing.assert_allclose(corpus.resample(tone(t22), 22050, 16000), tone(t16), atol=1e-3)


def test_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="utts_per_speaker"):
        corpus.build_corpus(tmp_path, speakers=2, utts_per_speaker=2, verbose=False)
    with pytest.raises(ValueError, match="speakers must be"):
        corpus.build_corpus(tmp_path, speakers=len(corpus.VOICES) + 1, verbose=False)
    with pytest.raises(ValueError, match="no training clip"):
        corpus.build_corpus(tmp_path, speakers=2, utts_per_speaker=4, val_frac=0.5, judge_frac=0.5,
                            verbose=False)


def test_cli(tmp_path, capsys):
    corpus.main(["--out", str(tmp_path), "--speakers", "3", "--utts_per_speaker", "3", "--unseen", "1"])
    assert "built 9 utterances" in capsys.readouterr().out
    assert json.loads((tmp_path / "corpus.json").read_text())["counts"] == {
        "train": 2, "val": 2, "judge": 2, "val_unseen": 1, "judge_unseen": 2}


def test_unseen_voices_are_held_out_of_training(tmp_path):
    """The last `unseen` voices never reach train.jsonl: their clips are split between val_unseen
    (references) and judge_unseen (centroids), and the seen voices are the same clips as without
    held-out voices (a speaker's sentences depend only on the seed and its index)."""
    info = corpus.build_corpus(tmp_path / "u", speakers=5, utts_per_speaker=4, seed=0, unseen=2, verbose=False)
    plain = corpus.build_corpus(tmp_path / "p", speakers=3, utts_per_speaker=4, seed=0, verbose=False)
    speakers = {split: {r["speaker"] for r in rows_of(info, split)} for split in corpus.SPLITS}
    assert speakers["train"] == speakers["val"] == speakers["judge"] == {"spk00", "spk01", "spk02"}
    assert speakers["val_unseen"] == speakers["judge_unseen"] == {"spk03", "spk04"}
    assert {r["speaker"] for r in rows_of(info, "base")} == {"spk00", "spk01", "spk02"}  # nor the base's
    assert len(rows_of(info, "val_unseen")) == 2 and len(rows_of(info, "judge_unseen")) == 2 * 3
    assert [info["speakers"][f"spk{k:02d}"]["seen"] for k in range(5)] == [True] * 3 + [False] * 2
    for split in ("train", "val", "judge"):
        assert [r["text"] for r in rows_of(info, split)] == [r["text"] for r in rows_of(plain, split)]
    with pytest.raises(ValueError, match="unseen must be"):
        corpus.build_corpus(tmp_path / "x", speakers=3, utts_per_speaker=4, unseen=3, verbose=False)


def test_extra_voices_only_add_training_clips(tmp_path):
    """Extra voices put their clips in train only, use no variant of a held-out voice, and leave every
    judged voice's clips (and the base's training set) as they were."""
    info = corpus.build_corpus(tmp_path / "x", speakers=4, utts_per_speaker=4, unseen=2, extra_voices=3, extra_utts=2,
                               verbose=False)
    plain = corpus.build_corpus(tmp_path / "p", speakers=4, utts_per_speaker=4, unseen=2, verbose=False)
    assert info["hash"] != plain["hash"]
    train = rows_of(info, "train")
    assert [r["speaker"] for r in train if r["speaker"].startswith("x")] == ["x00"] * 2 + ["x01"] * 2 + ["x02"] * 2
    for split in ("base", "val", "judge", "val_unseen", "judge_unseen"):  # the base DiT never hears them
        assert rows_of(info, split) == rows_of(plain, split)
    held_out = {corpus.VOICES[k][0].partition("+")[2] for k in (2, 3)}
    extras = [s for name, s in info["speakers"].items() if s["extra"]]
    assert len(extras) == 3 and all(s["seen"] for s in extras)
    assert not held_out & {s["voice"].partition("+")[2] for s in extras}
    assert len({s["voice"].partition("+")[2] for s in extras}) == 3  # distinct formant sets
    assert info["counts"]["train"] == len(rows_of(plain, "train")) + 6


def test_extra_voices_avoid_every_held_out_variant():
    held_out = [v[0] for v in corpus.VOICES[8:16]]
    voices = corpus.draw_extra_voices(100, seed=1, held_out=held_out)
    variants = {v[0].partition("+")[2] for v in voices}
    assert len(voices) == 100 and not variants & {h.partition("+")[2] for h in held_out}
    assert variants <= set(corpus.EXTRA_VARIANTS) <= corpus.Espeak.get().variants  # names eSpeak knows
    assert corpus.draw_extra_voices(5, 1, held_out) == voices[:5]  # more voices keep the first ones
    assert corpus.draw_extra_voices(5, 2, held_out) != voices[:5]


def test_voice_table_has_sixteen_distinct_voices():
    """At least 16 voices, no two alike (the zero-shot split needs voices to hold out)."""
    assert len(corpus.VOICES) >= 16
    assert len({v[:4] for v in corpus.VOICES}) == len(corpus.VOICES)


def test_tiny_prompts_fit_max_text_len():
    """The tiny preset pads text to just above the grammar's longest prompt (the padding costs
    connector and cross-attention work every step): the longest sentence the grammar can make,
    in the corpus's prompt format, must still fit with its BOS, or the byte tokenizer truncates it."""
    import random

    import yaml

    import text

    longest = lambda words: max(words, key=len)
    line = (f"the {longest(corpus.ADJECTIVES)} {longest(corpus.NOUNS)} {longest(corpus.VERBS)} "
            f"{longest(corpus.PREPOSITIONS)} the {longest(corpus.ADJECTIVES)} {longest(corpus.NOUNS)}")
    assert all(len(corpus.sentence(random.Random(s))) <= len(line) for s in range(2000))
    prompt = corpus.prompt(line)
    max_text_len = yaml.safe_load((Path(__file__).parent.parent / "configs" / "tiny.yaml").read_text())["max_text_len"]
    ids, mask = text.byte_tokenize([prompt], max_text_len)
    assert int(mask.sum()) == len(prompt.encode()) + 1  # every byte and the BOS survive
    # the base's described prompts: no voice's description is longer than the shared one
    assert max(len(v[4].encode()) for v in corpus.VOICES) <= len(corpus.DESCRIPTION.encode())
    assert max_text_len - (len(prompt) + 1) <= 2  # and little padding is left on the longest prompt
