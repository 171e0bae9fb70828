"""pipeline.py: the whole recipe (corpus -> prepare -> base -> lora -> merge -> adaln -> sample ->
eval) runs end to end at the microscopic size of configs/micro.yaml, hands each stage's output to
the next, and leaves every artefact and the summary / judge numbers it promises."""

import json
import math
from pathlib import Path

import pytest
from safetensors import safe_open

import adaln as adaln_lib
import files
import model as model_lib
import pipeline
import sample as sample_lib
import train
from config import load_config

ROOT = Path(__file__).resolve().parent.parent
MICRO = str(ROOT / "configs" / "micro.yaml")


GENERATED = []  # items per sample() call of the run's sample step, in VARIANTS order


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    argv = [MICRO, f"--out_dir={tmp / 'runs'}", f"--corpus_dir={tmp / 'corpus'}", f"--cache_dir={tmp / 'cache'}",
            "--name=smoke", "--corpus_judge_frac=0.4", "--sample_shift_tokens=40", "--sample_sigma_last=0.05",
            "--sample_spk_sigma=[0.3,1.0]", "--corpus_extra_voices=2", "--corpus_extra_utts=2"]
    real_sample = sample_lib.sample

    def counting_sample(*args, **kwargs):
        GENERATED.append(len(args[4]))  # the prompts
        return real_sample(*args, **kwargs)

    sample_lib.sample = counting_sample
    try:
        summary = pipeline.main(argv)
    finally:
        sample_lib.sample = real_sample
    return tmp, summary


def test_every_step_ran_and_was_timed(run):
    tmp, summary = run
    assert list(summary["times_s"]) == list(pipeline.STEPS)
    assert all(t > 0 for t in summary["times_s"].values())
    on_disk = json.loads((tmp / "runs" / "smoke" / "summary.json").read_text())
    assert on_disk["times_s"] == summary["times_s"] and on_disk["name"] == "smoke"
    # each training stage's last held-out record, read back from its own metrics.jsonl
    assert list(summary["validation"]) == list(pipeline.STAGE_OUTPUT)
    for stage, val in summary["validation"].items():
        lines = (tmp / "runs" / f"smoke_{stage}" / "metrics.jsonl").read_text().splitlines()
        last = [r for r in map(json.loads, filter(str.strip, lines)) if "val_loss" in r][-1]
        assert val["val_loss"] == last["val_loss"] and val["val_text_gain"] == last["val_text_gain"]
        assert math.isfinite(val["val_text_gain"]), val


def test_the_corpus_is_split_as_configured(run):
    """corpus_utts 5 at corpus_val_frac 0.15 and corpus_judge_frac 0.4: 1 val, 2 judge, 2 train clips a seen voice;
    2 extra voices add 2 clips each to train, which the speaker encoder and stage 1 learn from, and none to the base."""
    tmp, _ = run
    info = json.loads((tmp / "corpus" / "corpus.json").read_text())
    assert info["settings"]["judge_frac"] == 0.4 and info["settings"]["extra_voices"] == 2
    assert {split: info["counts"][split] for split in ("train", "val", "judge")} == {"train": 10, "val": 3, "judge": 6}
    speakers = lambda path: {json.loads(line)["speaker"] for line in path.read_text().splitlines()}
    assert {"x00", "x01"} <= speakers(tmp / "corpus" / "train.jsonl")
    assert not {"x00", "x01"} & speakers(tmp / "corpus" / "base.jsonl")
    sv = json.loads(files.read_safetensors_metadata(tmp / "runs" / "smoke_sv" / "sv.safetensors")["summary"])
    assert {"x00", "x01"} <= set(sv["voices"])


def test_stage_outputs_chain(run):
    tmp, _ = run
    runs = tmp / "runs"
    for path in ("smoke_base/dit.safetensors", "smoke_lora/lora.safetensors", "smoke/merged.safetensors",
                 "smoke_adaln/adaln.safetensors", "smoke/judge.safetensors", "smoke/report.html"):
        assert (runs / path).is_file(), path
    # each stage trained on top of the previous stage's output
    lora_cfg = json.loads((runs / "smoke_lora" / "config.json").read_text())["config"]
    adaln_cfg = json.loads((runs / "smoke_adaln" / "config.json").read_text())["config"]
    assert lora_cfg["stage"] == "lora" and lora_cfg["ckpt"] == str(runs / "smoke_base" / "dit.safetensors")
    assert adaln_cfg["stage"] == "adaln" and adaln_cfg["ckpt"] == str(runs / "smoke" / "merged.safetensors")
    # the base trains on the corpus's base.jsonl (clips also under their voice's description) in a cache
    # of its own; the stages with the speaker path on the train split (one shared description)
    base_cfg = json.loads((runs / "smoke_base" / "config.json").read_text())["config"]
    assert (base_cfg["manifest"], base_cfg["cache_dir"]) == (str(tmp / "corpus" / "base.jsonl"),
                                                             str(tmp / "cache" / "base"))
    for cfg in (lora_cfg, adaln_cfg):
        assert (cfg["manifest"], cfg["cache_dir"]) == (str(tmp / "corpus" / "train.jsonl"), str(tmp / "cache"))
    items = {d: json.loads((tmp / "cache" / d / "index.json").read_text())["items"] for d in ("base/train", "train")}
    judged = [item for item in items["train"] if not item["speaker"].startswith("x")]  # the extra voices: train only
    assert len(items["base/train"]) == 2 * len(judged) < 2 * len(items["train"])
    # the merge changed the adapted weights (LoRA B is trained away from zero) and only those
    with safe_open(str(runs / "smoke_base" / "dit.safetensors"), "pt") as base, \
            safe_open(str(runs / "smoke" / "merged.safetensors"), "pt") as merged:
        assert set(base.keys()) == set(merged.keys())
        changed = {k for k in base.keys() if not base.get_tensor(k).equal(merged.get_tensor(k))}
    assert changed and all("audio_attn1" in k or "audio_ff" in k for k in changed), sorted(changed)[:5]
    # speaker-aware stage 1 (lora_speaker): its SpeakerAdaLNZero is where stage 2 starts
    assert lora_cfg["lora_speaker"] and adaln_cfg["adaln_init"] == str(runs / "smoke_lora" / "adaln.safetensors")
    stage1, _ = adaln_lib.read_adaln_file(runs / "smoke_lora" / "adaln.safetensors")
    stage2, _ = adaln_lib.read_adaln_file(runs / "smoke_adaln" / "adaln.safetensors")
    assert stage1.keys() == stage2.keys() and any(stage1[k].abs().sum() > 0 for k in stage1 if k.startswith("heads."))


def test_stage2_starts_from_the_stage1_adaln(run):
    """train.speaker_adaln loads adaln_init exactly, and refuses one of another width naming the file."""
    tmp, _ = run
    runs = tmp / "runs"
    cfg = load_config([MICRO, "--stage=adaln", f"--adaln_init={runs / 'smoke_lora' / 'adaln.safetensors'}"])
    dit = model_lib.load_dit(str(runs / "smoke" / "merged.safetensors"))
    stage1, _ = adaln_lib.read_adaln_file(cfg.adaln_init)
    net = train.speaker_adaln(cfg, dit, stage1["mlp.0.weight"].shape[1])
    for k, v in net.state_dict().items():
        assert v.equal(stage1[k]), k
    wide = load_config([MICRO, "--stage=adaln", f"--adaln_init={cfg.adaln_init}", "--adaln_hidden=32"])
    with pytest.raises(ValueError, match="adaln_init.*adaln_hidden 32"):
        train.speaker_adaln(wide, dit, stage1["mlp.0.weight"].shape[1])


def test_samples_cover_every_prompt_and_speaker(run):
    tmp, _ = run
    rows = lambda split: [json.loads(line) for line in (tmp / "corpus" / f"{split}.jsonl").read_text().splitlines()
                          if line]
    val = rows("val")
    for group, refs in (("", val), ("_unseen", rows("val_unseen"))):
        speakers = sorted({r["speaker"] for r in refs})
        assert len(speakers) == (3 if group == "" else 2)
        for variant in pipeline.VARIANTS:
            d = tmp / "runs" / "smoke" / "samples" / f"{variant}{group}"
            metas = [json.loads(p.read_text()) for p in sorted(d.glob("*.json"))]
            assert len(metas) == len(val) * len(speakers)
            assert all(Path(p).with_suffix(".wav").is_file() for p in d.glob("*.json"))
            assert {m["speaker"] for m in metas} == set(speakers) and {m["variant"] for m in metas} == {variant}
            assert {m["seen"] for m in metas} == {group == ""}
            assert {m["prompt"] for m in metas} == {r["text"] for r in val}
            # references are held-out clips, never the generator's or the judge's training clips
            assert all(Path(m["ref"]).parent.parent.name == "wavs" and any(m["ref"].endswith(r["audio"]) for r in refs)
                       for m in metas)
    # the baseline never hears the reference: each prompt is generated once and is every voice's sample
    assert GENERATED == [len(val), len(val) * 5, len(val) * 5]  # baseline, adaln, adaln_guided; 3 + 2 voices
    baseline = {}
    for d in ("baseline", "baseline_unseen"):
        for side in sorted((tmp / "runs" / "smoke" / "samples" / d).glob("*.json")):
            meta = json.loads(side.read_text())
            baseline.setdefault((meta["prompt"], meta["duration_s"]), set()).add(side.with_suffix(".wav").read_bytes())
    assert len(baseline) == len(val) and all(len(v) == 1 for v in baseline.values())
    train_speakers = {r["speaker"] for r in rows("train")}
    assert train_speakers == {"spk00", "spk01", "spk02", "x00", "x01"}  # the held-out voices were never trained on
    guided = json.loads(next((tmp / "runs" / "smoke" / "samples" / "adaln_guided").glob("*.json")).read_text())
    plain = json.loads(next((tmp / "runs" / "smoke" / "samples" / "adaln").glob("*.json")).read_text())
    assert guided["spk_cfg"] > 1.0 and plain["spk_cfg"] == 1.0
    assert plain["shift_tokens"] == guided["shift_tokens"] == 40  # the σ schedule of the config reached sample()
    assert plain["sigma_last"] == guided["sigma_last"] == 0.05
    assert guided["spk_sigma"] == [0.3, 1.0] and plain["spk_sigma"] == [0.0, 1.0]  # the guidance interval: guided only


def test_judge_json_and_report(run):
    tmp, summary = run
    judge = json.loads((tmp / "runs" / "smoke" / "judge.json").read_text())
    assert judge["chance"] == pytest.approx(1 / 3)  # micro: 3 speakers
    assert judge["speakers"] == ["spk00", "spk01", "spk02"]
    ge2e = judge["ge2e"]
    assert set(ge2e) == {"seen", "unseen"}
    assert ge2e["seen"]["real_val"]["chance"] == pytest.approx(1 / 3)
    assert ge2e["unseen"]["real_val"]["chance"] == pytest.approx(1 / 2)
    for key in ("real_val", *pipeline.VARIANTS):
        assert judge[key]["n"] == ge2e["seen"][key]["n"] == (3 if key == "real_val" else 9)
        assert ge2e["unseen"][key]["n"] == (2 if key == "real_val" else 6)
    # Without a speaker path a prompt's sample is the same clip whatever the reference: both judges
    # must then score exactly chance with zero margin (one reference in S is "right"). A speaker
    # leak into the baseline, or samples filed under the wrong reference, breaks this.
    for scores, chance in ((judge["baseline"], 1 / 3), (ge2e["seen"]["baseline"], 1 / 3),
                           (ge2e["unseen"]["baseline"], 1 / 2)):
        assert scores["accuracy"] == pytest.approx(chance) and scores["margin"] == pytest.approx(0, abs=1e-5)
    assert summary["judge"] == judge
    page = (tmp / "runs" / "smoke" / "report.html").read_text()
    assert "cer_chance" in page
    assert "judge_acc" in page and "judge_margin" in page and "adaln_guided" in page
    scores = json.loads((tmp / "runs" / "smoke" / "scores.json").read_text())
    # the report's per-variant judge accuracy is the same number as judge.json's
    for variant in pipeline.VARIANTS:
        accs = [v for k, v in scores["scores"]["judge_acc"].items() if k.startswith(variant + "/")]
        assert sum(accs) / len(accs) == pytest.approx(judge[variant]["accuracy"])


def test_asr_step_trains_the_recogniser_that_scores_the_words(run):
    """The asr step's recogniser (trained on the train split, tested on the judge split) is what eval.py
    transcribed every sample with; the summary's `words` are the means of the report's per-sample scores."""
    import asr
    import files

    tmp, summary = run
    path = tmp / "runs" / "smoke" / "asr.safetensors"
    asr.load_recogniser(path)
    meta = files.read_json_metadata(path, "summary")
    assert meta["manifest"] == str(tmp / "corpus" / "train.jsonl") and meta["steps"] == 20
    assert meta["test"] == str(tmp / "corpus" / "judge.jsonl") and 0 <= meta["test_cer"]
    scores = json.loads((tmp / "runs" / "smoke" / "scores.json").read_text())["scores"]
    words = summary["words"]
    assert words["real_test"] == meta["test_cer"]
    for variant in pipeline.VARIANTS:
        for metric in ("cer", "cer_chance"):
            values = [v for k, v in scores[metric].items() if k.startswith(variant + "/")]
            assert len(values) == 9 and all(v >= 0 for v in values)
            assert words[variant][metric] == pytest.approx(sum(values) / len(values), abs=1e-4)


@pytest.mark.parametrize("override, message", [
    ("--pipeline=base,corpus", "in the order"),
    ("--pipeline=corpus,train", "unknown pipeline steps"),
    ("--pipeline=", "is empty"),
    ("--stage_configs={adaln: configs/missing.yaml}", "file not found"),
    ("--stage_configs={merge: configs/micro_base.yaml}", "not a training stage"),
    ("--pipeline=[sample,eval]", "add the asr step"),  # micro's eval_metrics has cer: no recogniser to score with
])
def test_bad_config_is_refused_before_any_work(tmp_path, override, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        pipeline.main([MICRO, f"--out_dir={tmp_path}", override])
    assert not (tmp_path / "micro").exists()


def test_thread_settings_are_per_call_and_restored(tmp_path):
    """cpu_threads reaches the step processes (OMP_NUM_THREADS) of this call only, and the caller's
    torch thread count is back afterwards: the learning test and this smoke test share a process."""
    import torch

    argv = [MICRO, "--pipeline=[corpus]", f"--out_dir={tmp_path / 'runs'}", f"--corpus_dir={tmp_path / 'corpus'}",
            "--name=threads"]
    before = torch.get_num_threads()
    pipeline.main([*argv, "--cpu_threads=2"])
    assert pipeline.THREAD_ENV == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    assert torch.get_num_threads() == before
    pipeline.main([*argv, "--cpu_threads=0"])
    assert pipeline.THREAD_ENV == {} and torch.get_num_threads() == before


def test_prepare_fits_the_mel_basis_every_stage_then_uses(tmp_path):
    """mel_basis_dim > 0 and no mel_basis: the prepare step fits the basis on the train split into
    <name>_codec/basis.safetensors (= codec.fit_mel_basis on those clips) and caches latents of
    mel_basis_dim features made with it; the config the cache records (what sampling builds its
    codec from) names the file."""
    import torch

    import codec as codec_lib
    import data
    import judge as judge_lib

    runs = tmp_path / "runs"
    pipeline.main([MICRO, "--pipeline=[corpus,sv,prepare]", f"--out_dir={runs}", f"--corpus_dir={tmp_path / 'corpus'}",
                   f"--cache_dir={tmp_path / 'cache'}", "--name=basis", "--mel_n_mels=8", "--mel_basis_dim=16"])
    path = runs / "basis_codec" / "basis.safetensors"
    cfg = load_config([MICRO, "--mel_n_mels=8", "--mel_basis_dim=16", f"--mel_basis={path}"])
    built = codec_lib.codec_from_config(cfg)
    clips, _ = judge_lib.load_split(tmp_path / "corpus" / "train.jsonl")
    want = codec_lib.fit_mel_basis(codec_lib.codec_from_config(cfg, fitting=True), [c[None] for c in clips], 16)
    assert all(torch.allclose(built.basis[k], want[k], atol=1e-6) for k in want)
    recorded, _ = data.prepared_config(load_config([MICRO, f"--cache_dir={tmp_path / 'cache'}"]))
    assert recorded["mel_basis"] == str(path) and recorded["mel_basis_dim"] == 16
    index = json.loads((tmp_path / "cache" / "train" / "index.json").read_text())
    with safe_open(str(data.entry_path(tmp_path / "cache" / "train", index["items"][0]["id"])), "pt") as f:
        assert f.get_tensor("latent").shape[-1] == 16


def test_development_split_speaks_other_prompts_with_other_references(tmp_path):
    """sample_split development: the next sample_prompts val prompts and each voice's second clip,
    scored under RUN/development/ so the held-out numbers stay where they were."""
    import numpy as np
    import soundfile as sf

    def manifest(name, speakers):
        rows = []
        for spk in speakers:
            for k in range(2):
                wav = tmp_path / "wavs" / f"{spk}_{k}.wav"
                wav.parent.mkdir(exist_ok=True)
                sf.write(wav, np.zeros(16000 + 1600 * len(rows), dtype=np.float32), 16000)
                rows.append({"audio": f"wavs/{wav.name}", "text": f'A voice. "{spk} {k}"', "speaker": spk})
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    manifest("val.jsonl", ["spk00", "spk01"])
    manifest("val_unseen.jsonl", ["spk02"])
    argv = [MICRO, f"--corpus_dir={tmp_path}", f"--out_dir={tmp_path / 'runs'}", "--name=dev", "--sample_prompts=2",
            "--corpus_unseen=1"]
    held, dev = (load_config([*argv, f"--sample_split={s}"]) for s in ("held_out", "development"))
    prompts, seconds, refs, unseen = pipeline.sample_plan(held, pipeline.paths(held))
    assert prompts == ['A voice. "spk00 0"', 'A voice. "spk00 1"'] and seconds == [1.0, 1.1]
    assert refs == {s: str(tmp_path / "wavs" / f"{s}_0.wav") for s in ("spk00", "spk01")}
    assert unseen == {"spk02": str(tmp_path / "wavs" / "spk02_0.wav")}
    prompts, seconds, refs, unseen = pipeline.sample_plan(dev, pipeline.paths(dev))
    assert prompts == ['A voice. "spk01 0"', 'A voice. "spk01 1"'] and seconds == [1.2, 1.3]
    assert refs == {s: str(tmp_path / "wavs" / f"{s}_1.wav") for s in ("spk00", "spk01")}
    assert unseen == {"spk02": str(tmp_path / "wavs" / "spk02_1.wav")}
    p_held, p_dev = pipeline.paths(held), pipeline.paths(dev)
    for key in ("samples", "judge_json", "report", "scores", "summary"):
        assert p_dev[key] == p_held[key].parent / "development" / p_held[key].name
    assert p_dev["merged"] == p_held["merged"]  # the same models
    with pytest.raises(ValueError, match="needs 6 val prompts"):
        too_many = load_config([*argv, "--sample_split=development", "--sample_prompts=3"])
        pipeline.sample_plan(too_many, pipeline.paths(too_many))
    (tmp_path / "val.jsonl").write_text((tmp_path / "val.jsonl").read_text().splitlines()[0] + "\n")
    with pytest.raises(ValueError, match=r"val.jsonl: speakers \['spk00'\] have no clip number 2"):
        pipeline.sample_plan(dev, pipeline.paths(dev))
