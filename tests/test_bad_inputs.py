"""Every bad input and fault of records/2026-11-29_bad_inputs.md, made on the fly (small) and run
through the real entry points (data.py prepare, sample.py, merge.py), so that the table stays true.

Each case gives the command's exit status and an excerpt of what it printed; the record's table
lists the same cases with the same excerpts (checked below), so neither can change alone. Errors
must be ONE line naming the file, without a traceback (`config.run_cli`)."""

import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import adaln  # noqa: E402
import data  # noqa: E402
import files  # noqa: E402
import lora  # noqa: E402
import merge  # noqa: E402
import model as M  # noqa: E402
import sample  # noqa: E402
import sampler  # noqa: E402
from config import run_cli  # noqa: E402

RECORD = ROOT / "records" / "2026-11-29_bad_inputs.md"
SR = 16000
# the micro model's data settings (configs/micro.yaml): 4 mel bins x 4 frames = the preset's 16 features
MICRO = ["--model=micro", "--mel_n_mels=4", "--max_text_len=32", "--griffin_lim_iters=2", "--device=cpu",
         "--dtype=fp32", "--speaker_extractors=mel_stats"]


def tone(seconds, sr=SR, channels=1, amp=0.3):
    t = np.arange(int(seconds * sr)) / sr
    wav = (amp * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    return np.stack([wav] * channels, 1) if channels > 1 else wav


# -----------------------------------------------------------------------------------------------
# the inputs


def make_audio(d):
    """{name: path} of every audio input of the table, each a few kB (the 10-minute one ~5 MB)."""
    d.mkdir(parents=True, exist_ok=True)
    out = {}

    def write(name, wav, sr=SR, subtype="PCM_16"):
        out[name] = d / f"{name}.wav"
        sf.write(out[name], wav, sr, subtype=subtype)

    write("good", tone(1.5))
    write("empty", np.zeros((0, 1), np.float32))
    nan = tone(1.5)
    nan[100] = np.nan
    write("nan", nan, subtype="FLOAT")
    write("eight_bit", tone(1.5), subtype="PCM_U8")
    write("surround_48k", tone(1.5, sr=48000, channels=6), sr=48000)
    write("one_sample", np.array([0.5], np.float32))
    write("silence", np.zeros(SR * 2, np.float32))
    write("ten_minutes", tone(600, sr=8000), sr=8000, subtype="PCM_U8")
    write("rate_8k", tone(1.5, sr=8000), sr=8000)
    write("clipped", np.clip(tone(1.5, amp=3.0), -1, 1))
    write("unicode_stimme_ü_語", tone(1.5))
    out["truncated"] = d / "truncated.wav"
    out["truncated"].write_bytes(out["good"].read_bytes()[:200])  # the header promises 1.5 s
    out["text_named_wav"] = d / "text_named_wav.wav"
    out["text_named_wav"].write_text("this is a text file, not audio\n" * 20)
    out["missing"] = d / "missing.wav"
    return out


def manifest(path, rows, encoding="utf-8"):
    path.write_bytes("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode(encoding))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_inputs")
    audio = make_audio(d / "wavs")
    return d, audio


# -----------------------------------------------------------------------------------------------
# running an entry point as the command line does


def run(main, argv, capsys):
    """(exit status, stdout + stderr) of `main(argv)` under config.run_cli, as `python X.py argv`."""
    capsys.readouterr()
    try:
        run_cli(main, [str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)  # what Python prints for SystemExit("message")
    got = capsys.readouterr()
    return code, got.out + got.err


def prepare(d, rows, capsys, *extra, name="m", encoding="utf-8"):
    m = manifest(d / f"{name}.jsonl", rows, encoding)
    return run(data.main, ["prepare", *MICRO, f"--manifest={m}", f"--cache_dir={d / ('cache_' + name)}", *extra],
               capsys)


AUDIO_CASES = {  # input -> (exit status of prepare, excerpt of its output)
    "good": (0, "1 encoded"),
    "empty": (1, "audio is empty (0 samples)"),
    "truncated": (1, "truncated WAV: its header announces 47844 more bytes of audio than the file holds"),
    "nan": (1, "audio contains NaN or Inf samples"),
    "eight_bit": (0, "1 encoded"),
    "surround_48k": (0, "1 resampled"),
    "one_sample": (1, "is shorter than min_seconds=1.0"),
    "silence": (1, "audio is silent"),
    "ten_minutes": (1, "600.00 s is longer than max_seconds=20.0"),
    "rate_8k": (0, "1 resampled"),
    "text_named_wav": (1, "cannot read audio"),
    "missing": (1, "file not found"),
    "clipped": (0, "1 encoded"),
    "unicode_stimme_ü_語": (0, "1 encoded"),
}


@pytest.mark.parametrize("name", AUDIO_CASES)
def test_audio_input(inputs, capsys, name):
    d, audio = inputs
    code, out = prepare(d, [{"audio": str(audio[name]), "text": "Hallo — 你好 ✓", "speaker": "s"}], capsys,
                        name=f"a_{name}")
    want_code, excerpt = AUDIO_CASES[name]
    check(code, out, want_code, excerpt, audio[name] if want_code else None)


def check(code, out, want_code, excerpt, names=None):
    assert code == want_code, out
    assert excerpt in out, out
    assert "Traceback" not in out
    if want_code:
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, out  # one line (prepare prints its config and progress before it)
        if names is not None:
            assert str(names) in errors[0], out


def test_skip_bad_names_every_skipped_file(inputs, capsys):
    d, audio = inputs
    rows = [{"audio": str(p), "text": "hello", "speaker": "s"} for p in audio.values()]
    rows.append({"audio": str(audio["good"].name), "text": "", "speaker": "s", "id": "no_transcript"})
    code, out = prepare(d, rows, capsys, "--skip_bad=true", name="skip")
    listed = d / "cache_skip" / "train" / "skipped.jsonl"
    check(code, out, 0, f"(the skipped files and why: {listed})")
    skipped = [json.loads(line) for line in listed.read_text(encoding="utf-8").splitlines()]
    bad = {n for n, (c, _) in AUDIO_CASES.items() if c}
    assert {Path(s["audio"]).stem for s in skipped} == bad | {"good"}  # good.wav once more, without text
    assert {s["reason"] for s in skipped} >= {"empty", "nan", "too_short", "silent", "too_long", "unreadable",
                                             "missing_file", "missing_text", "truncated"}
    assert all(s["where"].startswith(str(d / "skip.jsonl:")) and s["message"] for s in skipped)


MANIFEST_CASES = {  # manifest fault -> (rows or raw bytes, encoding, excerpt)
    "no_transcript": ([{"audio": "wavs/good.wav", "text": ""}], "utf-8", "has no text"),
    "malformed_json": (b'{"audio": "wavs/good.wav", "text": "hi"\n', None, "m_malformed_json.jsonl:1: invalid JSON"),
    "latin1": ([{"audio": "wavs/good.wav", "text": "Grüße, café"}], "latin-1", "m_latin1.jsonl: not UTF-8 (byte"),
    "duplicate_paths": ([{"audio": "wavs/good.wav", "text": "a"}, {"audio": "./wavs/good.wav", "text": "b"},
                         {"audio": "../" + "{dir}/wavs/good.wav", "text": "c"}], "utf-8",
                        "m_duplicate_paths.jsonl:2: duplicate item: './wavs/good.wav' is the file of line 1"),
}


@pytest.mark.parametrize("name", MANIFEST_CASES)
def test_manifest_fault(inputs, capsys, name):
    d, _ = inputs
    rows, encoding, excerpt = MANIFEST_CASES[name]
    path = d / f"m_{name}.jsonl"
    if isinstance(rows, bytes):
        path.write_bytes(rows)
    else:
        rows = [{k: v.replace("{dir}", d.name) for k, v in r.items()} for r in rows]
        manifest(path, rows, encoding)
    code, out = run(data.main, ["prepare", *MICRO, f"--manifest={path}", f"--cache_dir={d / 'cache_m'}"], capsys)
    check(code, out, 1, excerpt)
    if name != "no_transcript":  # found on reading the manifest, before the config dump and any model
        assert len(out.strip().splitlines()) == 1, out


# -----------------------------------------------------------------------------------------------
# artefacts: checkpoints, LoRAs, SpeakerAdaLNZero files, configs, references


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    return make_artefacts(tmp_path_factory.mktemp("artefacts"))


def make_artefacts(d):
    """A micro DiT with its connector, a LoRA, an adaln.safetensors and their damaged copies, in `d`."""
    import text

    torch.manual_seed(0)
    dit = M.AudioDiT(M.PRESETS["micro"])
    connector = text.build_text_connector("micro", device="cpu", seed=0)
    meta = json.loads(M.metadata_from_dit_config(dit.cfg)["config"])
    meta["transformer"].update(text.connector_metadata(connector))
    M.save_dit(dit, d / "dit.safetensors", metadata={"config": json.dumps(meta)},
               extra=text.connector_checkpoint_tensors(connector))
    raw = (d / "dit.safetensors").read_bytes()
    header, _, start = files.read_header(d / "dit.safetensors")
    for name, part in (("nan_dit", "audio_attn1"), ("nan_connector", "embeddings_connector")):
        key = next(k for k in header if part in k and header[k]["dtype"] == "F32")
        at = start + header[key]["data_offsets"][0]
        (d / f"{name}.safetensors").write_bytes(raw[:at] + struct.pack("<f", float("nan")) + raw[at + 4:])  # same size
    (d / "truncated_dit.safetensors").write_bytes(raw[: len(raw) // 2])
    (d / "text_dit.safetensors").write_text("model weights: see the README\n" * 50)

    lora.inject_lora(dit, ["audio_attn1"], rank=2, alpha=2)
    lora.save_lora(dit, d / "lora.safetensors", base_model_id="micro")
    save_file({}, str(d / "empty_lora.safetensors"))
    state = lora.lora_state_dict(dit)
    state[next(iter(state))][0, 0] = float("nan")
    save_file(state, str(d / "nan_lora.safetensors"))

    from speaker import build_speaker_extractors

    spk = build_speaker_extractors(["mel_stats"], {})
    net = adaln.SpeakerAdaLNZero(spk.dim, num_blocks=2, dim=dit.cfg.dim, rows=dit.cfg.ada_rows, hidden=8)
    adaln.save_adaln(net, d / "adaln.safetensors", config={"speaker_extractors": ["mel_stats"]})
    state = dict(net.state_dict())
    state["heads.1.bias"] = torch.full_like(state["heads.1.bias"], float("inf"))
    save_file(state, str(d / "nan_adaln.safetensors"))

    class Payload:  # what a malicious "adaln.pt" from a model hub does when unpickled
        def __reduce__(self):
            return (os.system, (f"touch {d / 'CODE_RAN'}",))

    torch.save({"state_dict": net.state_dict(), "config": Payload()}, d / "evil_adaln.pt")
    (d / "list.yaml").write_text("- model: micro\n- lr: 1\n")
    sf.write(d / "ref.wav", tone(2.0), SR)
    nan = tone(2.0)
    nan[5] = np.nan
    sf.write(d / "nan_ref.wav", nan, SR, subtype="FLOAT")
    sf.write(d / "silent_ref.wav", np.zeros(2 * SR, np.float32), SR)
    return d


ARTEFACT_CASES = {  # case -> (entry point, argv with {d} for the artefact dir, exit status, excerpt)
    "adaln_pickle": (sample.main, ["--ckpt", "{d}/dit.safetensors", "--adaln", "{d}/evil_adaln.pt", "--prompt", "hi"],
                     1, "evil_adaln.pt is a pickle with code/objects we do not load"),
    "adaln_nan": (sample.main, ["--ckpt", "{d}/dit.safetensors", "--adaln", "{d}/nan_adaln.safetensors",
                                "--prompt", "hi"], 1, "nan_adaln.safetensors: tensor 'heads.1.bias' holds NaN or Inf"),
    "adaln_text": (sample.main, ["--ckpt", "{d}/dit.safetensors", "--adaln", "{d}/list.yaml", "--prompt", "hi"],
                   1, "list.yaml: not a torch file"),
    "ckpt_nan_sample": (sample.main, ["--ckpt", "{d}/nan_dit.safetensors", "--prompt", "hi"],
                        1, "nan_dit.safetensors: tensor"),
    "ckpt_nan_connector": (sample.main, ["--ckpt", "{d}/nan_connector.safetensors", "--prompt", "hi"],
                           1, "nan_connector.safetensors: tensor 'model.diffusion_model.audio_embeddings_connector."),
    "ckpt_truncated_sample": (sample.main, ["--ckpt", "{d}/truncated_dit.safetensors", "--prompt", "hi"],
                              1, "truncated_dit.safetensors: truncated"),
    "ckpt_nan_merge": (merge.main, ["--ckpt", "{d}/nan_dit.safetensors", "--lora", "{d}/lora.safetensors",
                                    "--out", "{d}/out.safetensors", "--dtype", "keep"], 1, "nan_dit.safetensors: tensor"),
    "ckpt_truncated_merge": (merge.main, ["--ckpt", "{d}/truncated_dit.safetensors", "--lora", "{d}/lora.safetensors",
                                          "--out", "{d}/out.safetensors"], 1, "truncated_dit.safetensors: truncated"),
    "ckpt_text_merge": (merge.main, ["--ckpt", "{d}/text_dit.safetensors", "--lora", "{d}/lora.safetensors",
                                     "--out", "{d}/out.safetensors"], 1, "text_dit.safetensors: not a safetensors file"),
    "lora_empty": (merge.main, ["--ckpt", "{d}/dit.safetensors", "--lora", "{d}/empty_lora.safetensors",
                                "--out", "{d}/out.safetensors"], 1, "empty_lora.safetensors: no LoRA A/B pairs inside"),
    "lora_nan": (merge.main, ["--ckpt", "{d}/dit.safetensors", "--lora", "{d}/nan_lora.safetensors",
                              "--out", "{d}/out.safetensors"], 1, "nan_lora.safetensors: tensor"),
    "config_list_yaml": (sample.main, ["--ckpt", "{d}/dit.safetensors", "--config", "{d}/list.yaml", "--prompt", "hi"],
                         1, "list.yaml: a config file must be a YAML mapping"),
    "ref_nan": (sample.main, ["--ckpt", "{d}/dit.safetensors", "--ref", "{d}/nan_ref.wav", "--ref_mode", "tokens",
                              "--prompt", "hi"], 1, "nan_ref.wav: reference audio contains NaN or Inf"),
    "ref_silent": (sample.main, ["--ckpt", "{d}/dit.safetensors", "--ref", "{d}/silent_ref.wav", "--ref_mode", "tokens",
                                 "--prompt", "hi"], 1, "silent_ref.wav: reference audio is silent"),
    "ref_missing": (sample.main, ["--ckpt", "{d}/dit.safetensors", "--ref", "{d}/nope.wav", "--ref_mode", "tokens",
                                  "--prompt", "hi"], 1, "nope.wav: file not found"),
    "ckpt_missing": (merge.main, ["--ckpt", "{d}/nope.safetensors", "--lora", "{d}/lora.safetensors",
                                  "--out", "{d}/out.safetensors"], 1, "nope.safetensors: file not found"),
}


@pytest.mark.parametrize("name", ARTEFACT_CASES)
def test_artefact_fault(artefacts, capsys, name):
    main, argv, want_code, excerpt = ARTEFACT_CASES[name]
    code, out = run(main, [a.replace("{d}", str(artefacts)) for a in argv], capsys)
    check(code, out, want_code, excerpt)
    assert not (artefacts / "CODE_RAN").exists()  # nothing of a pickle was executed
    assert not (artefacts / "out.safetensors").exists() and not list(artefacts.glob("*.tmp.*"))  # nothing half-written


def test_generated_nan_is_never_written(artefacts):
    """Weights that are non-finite in memory (not from a file: those are refused on loading) make
    sample() raise before any WAV exists."""
    x0 = torch.zeros(1, 4, 16)
    with pytest.raises(ValueError, match="hold NaN / Inf.*nothing written"):
        sampler.check_generated(x0, torch.full((1, 1, 100), float("nan")))
    with pytest.raises(ValueError, match="constant 1.000 .DC"):
        sampler.check_generated(x0, torch.ones(1, 1, 100))
    sampler.check_generated(x0, torch.randn(1, 1, 100))


def test_one_line_and_exit_status_from_the_real_command(artefacts):
    """The same as a user sees it: a separate process, exit status 1, one line on stderr, and the
    traceback only with --debug."""
    argv = [sys.executable, str(ROOT / "sample.py"), "--ckpt", str(artefacts / "dit.safetensors"),
            "--adaln", str(artefacts / "evil_adaln.pt"), "--prompt", "hi"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith("error: "), p.stderr
    assert "is a pickle with code/objects we do not load" in p.stderr and not (artefacts / "CODE_RAN").exists()
    p = subprocess.run(argv + ["--debug"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert p.returncode == 1 and "Traceback" in p.stderr


# -----------------------------------------------------------------------------------------------
# the record and this file agree


def test_record_lists_every_case_with_its_excerpt():
    rows = {}
    for line in RECORD.read_text(encoding="utf-8").splitlines():
        m = re.match(r"\| `([a-z0-9_\u00e0-\uffff]+)` \|.*\| (\d) \| `(.+?)` \|$", line)
        if m:
            rows[m.group(1)] = (int(m.group(2)), m.group(3))
    cases = {**{k: v for k, v in AUDIO_CASES.items()},
             **{k: (1, v[2]) for k, v in MANIFEST_CASES.items()},
             **{k: (v[2], v[3]) for k, v in ARTEFACT_CASES.items()}}
    assert rows.keys() == cases.keys(), sorted(rows.keys() ^ cases.keys())
    for name, (code, excerpt) in cases.items():
        assert rows[name] == (code, excerpt.replace("|", "\\|")), name
