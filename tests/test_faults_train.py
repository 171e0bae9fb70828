"""train.py under faults and bad input: nothing lost, nothing silent, nothing executed.

A diverging run stops with one line naming the step and keeps its last good checkpoint; a finished
run is never overwritten without --overwrite; a cache made with other settings, a damaged or
diverged checkpoint, a pickle that would run code and out-of-range config values are one-line
errors with exit code 1; leftovers of killed writes and redone metrics lines are cleaned on resume.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import train
from conftest import ROOT, run_py

TRAIN = os.path.join(ROOT, "train.py")
COMMON = ["--global_batch=4", "--micro_batch=4", "--dtype=fp32", "--val_every=100", "--log_every=1",
          "--lr=3e-3", "--stage=base", "--device=cpu"]


def _train(work, data_args, name, *extra, check=True):
    return run_py([TRAIN, *data_args, *COMMON, f"--name={name}", *extra], cwd=work, check=check)


def _one_line_error(proc, *words):
    """Exit 1, stderr one line holding every word, no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)
    return err


@pytest.fixture(scope="module")
def finished(micro_corpus):
    """A finished 2-step run with a checkpoint of step 2 (copied by the tests that damage it)."""
    work, data_args = micro_corpus
    _train(work, data_args, "faults_done", "--max_steps=2", "--ckpt_every=100")
    return work / "runs" / "faults_done"


def test_divergence_stops_with_last_good_checkpoint_and_no_export(micro_corpus):
    work, data_args = micro_corpus
    proc = _train(work, data_args, "nan", "--lr=1e4", "--max_steps=6", "--ckpt_every=1", check=False)
    err = _one_line_error(proc, "step 3: training diverged", "runs/nan/checkpoint.pt (step 2)")
    assert "no weights exported" in err
    run = work / "runs" / "nan"
    assert not list(run.glob("dit*.safetensors"))
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(torch.isfinite(t).all() for t in ckpt["trainable"].values())


def test_no_best_claimed_without_a_best_file(micro_corpus):
    work, data_args = micro_corpus
    out = _train(work, data_args, "init_only", "--max_steps=0")  # no step, so no validation ran
    done = [line for line in out.stdout.splitlines() if line.startswith("done:")]
    assert done == ["done: 0 steps; weights in runs/init_only/dit.safetensors"]
    assert not list((work / "runs" / "init_only").glob("*_best*"))


def test_resume_refuses_a_diverged_checkpoint(micro_corpus, finished):
    work, data_args = micro_corpus
    run = work / "runs" / "nan_ckpt"
    run.mkdir()
    ckpt = torch.load(finished / "checkpoint.pt", weights_only=True)
    name = sorted(ckpt["trainable"])[3]
    ckpt["trainable"][name].view(-1)[0] = float("nan")
    torch.save(ckpt, run / "checkpoint.pt")
    proc = _train(work, data_args, "nan_ckpt", "--max_steps=4", "--resume=true", check=False)
    _one_line_error(proc, "checkpoint.pt", name, "NaN")
    assert not (run / "dit.safetensors").exists()


def test_finished_run_is_not_overwritten(micro_corpus, finished):
    work, data_args = micro_corpus
    before = (finished / "dit.safetensors").read_bytes()
    proc = _train(work, data_args, "faults_done", "--max_steps=2", "--lr=1e-2", check=False)
    _one_line_error(proc, "runs/faults_done already holds a run", "--resume=true", "--overwrite=true")
    assert (finished / "dit.safetensors").read_bytes() == before


def test_overwrite_replaces_the_run_and_its_metrics(micro_corpus, finished):
    work, data_args = micro_corpus
    run = work / "runs" / "faults_over"
    shutil.copytree(finished, run)
    (run / "dit_best.safetensors").write_bytes(b"stale")
    _train(work, data_args, "faults_over", "--max_steps=1", "--overwrite=true")
    steps = [json.loads(line)["step"] for line in open(run / "metrics.jsonl")]
    assert steps == [1, 1]  # one step line and its validation line; nothing of the old run
    assert (run / "dit_best.safetensors").read_bytes() != b"stale"


def test_resume_of_a_mistyped_name_is_an_error(micro_corpus):
    work, data_args = micro_corpus
    proc = _train(work, data_args, "faults_typo", "--max_steps=2", "--resume=true", check=False)
    _one_line_error(proc, "runs/faults_typo/checkpoint.pt not found", "faults_done")
    assert not (work / "runs" / "faults_typo").exists()


@pytest.mark.parametrize("arg, key", [("--mel_mean=-3", "mel_mean=-6.0"), ("--mel_n_fft=256", "mel_n_fft=512"),
                                      ("--seed=1", "seed=0"), ("--text_encoder=/no/gemma", "text_encoder='byte'")])
def test_cache_made_with_other_settings_is_refused(micro_corpus, arg, key):
    work, data_args = micro_corpus
    proc = _train(work, data_args, "stale", "--max_steps=1", arg, check=False)
    _one_line_error(proc, "index.json", key, "data.py prepare")
    assert not (work / "runs" / "stale").exists()


@pytest.mark.parametrize("stage", [["--stage=adaln"], ["--stage=lora", "--lora_speaker=true"]])
def test_speaker_path_cache_needs_its_speaker_extractors(micro_corpus, finished, stage):
    """Stage 2, and a speaker-aware stage 1, read the cached speaker features: another extractor is refused."""
    work, data_args = micro_corpus
    proc = _train(work, data_args, "stale2", *stage, f"--ckpt={finished / 'dit.safetensors'}",
                  "--speaker_extractors=[wavlm_sv]", check=False)
    _one_line_error(proc, "speaker_extractors=['mel_stats']")


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_resume_cleans_leftovers_and_redone_metrics(micro_corpus, finished):
    work, data_args = micro_corpus
    run = work / "runs" / "faults_resume"
    shutil.copytree(finished, run)
    at_step_2 = run / "checkpoint.pt.step2"
    shutil.copy(run / "checkpoint.pt", at_step_2)
    _train(work, data_args, "faults_resume", "--max_steps=4", "--resume=true")  # logs steps 3 and 4
    # a kill after step 4 was logged but before its checkpoint landed: the step-2 checkpoint is on
    # disk, with a half-written temp file of the next one and a cut metrics line
    os.replace(at_step_2, run / "checkpoint.pt")
    leftover = run / f"checkpoint.pt.tmp.{_dead_pid()}"
    leftover.write_bytes(b"half a checkpoint")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    out = _train(work, data_args, "faults_resume", "--max_steps=4", "--resume=true")
    assert "resumed from" in out.stdout and not leftover.exists()
    steps = [json.loads(line)["step"] for line in open(run / "metrics.jsonl") if '"lr"' in line]
    assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("content, words", [
    ("truncated", ["cannot resume", "checkpoint.pt: not a"]),
    (b"this is text, not a checkpoint\n", ["cannot resume", "checkpoint.pt: not a"]),
    (b"", ["cannot resume", "checkpoint.pt: not a"]),
    ("pickle", ["cannot resume", "checkpoint.pt", "pickle"]),
])
def test_damaged_checkpoint_on_resume(micro_corpus, finished, tmp_path, content, words):
    work, data_args = micro_corpus
    name = f"damaged_{len(list((work / 'runs').glob('damaged_*')))}"
    run = work / "runs" / name
    run.mkdir()
    marker = tmp_path / "code_ran"
    if content == "truncated":
        data = (finished / "checkpoint.pt").read_bytes()
        (run / "checkpoint.pt").write_bytes(data[: len(data) // 2])
    elif content == "pickle":
        class Evil:
            def __reduce__(self):
                return (open, (str(marker), "w"))
        torch.save({"step": Evil()}, run / "checkpoint.pt")
    else:
        (run / "checkpoint.pt").write_bytes(content)
    proc = _train(work, data_args, name, "--max_steps=2", "--resume=true", check=False)
    _one_line_error(proc, *words)
    assert not marker.exists(), "loading the checkpoint ran code"


@pytest.mark.parametrize("arg, words", [("--device=gpu", ["'device'", "'gpu'"]), ("--dtype=fp8", ["'dtype'", "'fp8'"]),
                                        ("--micro_batch=0", ["'micro_batch'", ">= 1"]),
                                        ("--max_steps=-1", ["'max_steps'", ">= 0"])])
def test_bad_values_are_one_line_errors(micro_corpus, arg, words):
    work, data_args = micro_corpus
    proc = _train(work, data_args, "bad_value", arg, check=False)
    _one_line_error(proc, *words)
    assert not (work / "runs" / "bad_value").exists()


def test_config_that_is_a_list_and_debug_traceback(micro_corpus, tmp_path):
    work, data_args = micro_corpus
    listed = tmp_path / "list.yaml"
    listed.write_text("- lr: 1\n")
    proc = run_py([TRAIN, str(listed)], cwd=work, check=False)
    _one_line_error(proc, "list.yaml: a config file must be a YAML mapping")
    proc = run_py([TRAIN, str(listed), "--debug=true"], cwd=work, check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_build_loads_the_dit_in_its_parameter_dtype(monkeypatch, finished):
    """No fp32 copy of a bf16 checkpoint: load_dit is asked for the storage dtype itself."""
    import model as model_lib

    asked = {}
    real = model_lib.load_dit

    def spy(path, **kw):
        asked.update(kw)
        return real(path, **kw)

    monkeypatch.setattr(model_lib, "load_dit", spy)
    cfg = train.load_config(["--model=micro", f"--ckpt={finished / 'dit.safetensors'}", "--param_dtype=bf16",
                             "--stage=lora", "--lora_targets=[audio]", "--lora_rank=2"])
    micro = model_lib.PRESETS["micro"]
    example = {"x0": torch.zeros(1, 4, 16), "text": torch.zeros(1, 4, micro.cross_attention_dim)}
    parts = train.build(cfg, torch.device("cpu"), example)
    assert asked["dtype"] == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for _, p in parts["trainable"])


def test_weight_snapshot_is_a_sample_not_a_copy():
    big = torch.nn.Parameter(torch.zeros(300, 100))
    small = torch.nn.Parameter(torch.zeros(10))
    named = [("blocks.0.w", big), ("blocks.1.w", small)]
    init = train.weight_snapshot(named)
    assert init["blocks.0.w"].numel() == train.SNAPSHOT_ELEMENTS and init["blocks.1.w"].numel() == 10
    with torch.no_grad():
        big += 1  # every element moved: every sampled one shows it
    assert train.weight_change(named, init)["blocks"]["changed_pct"] == pytest.approx(
        100 * train.SNAPSHOT_ELEMENTS / (train.SNAPSHOT_ELEMENTS + 10), abs=1e-3)
