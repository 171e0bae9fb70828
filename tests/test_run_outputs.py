"""The documented multi-process run and the files it leaves: `./run.sh --gpus 2 --cpu
configs/micro.yaml` trains every stage in 2 gloo processes, its deliverables are readable by other
users, and sample.py works from the run's files alone (no --config), as the README promises."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import background_run

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("base", "lora", "adaln")


@pytest.fixture(scope="module")
def run():
    """The work directory of `./run.sh --gpus 2 --cpu configs/micro.yaml --pipeline=[corpus,...,adaln]`, which
    conftest.py starts in the background once pytest has collected this file (see background_run)."""
    return Path(background_run("two_processes"))


def test_every_training_stage_ran_in_two_processes(run):
    for stage in STAGES:
        record = json.loads((run / "runs" / f"two_{stage}" / "config.json").read_text())
        assert record["world"] == 2 and record["config"]["train_processes"] == 2, stage


def test_deliverables_are_readable_by_other_users(run):
    runs = run / "runs"
    for path in (runs / "two_base" / "dit.safetensors", runs / "two_lora" / "lora.safetensors",
                 runs / "two" / "merged.safetensors", runs / "two_adaln" / "adaln.safetensors"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path


def sample(run, out, *extra):
    ref = next(iter(sorted((run / "corpus").rglob("*.wav"))))
    cmd = [sys.executable, str(ROOT / "sample.py"), "--ckpt", str(run / "runs" / "two" / "merged.safetensors"),
           "--adaln", str(run / "runs" / "two_adaln" / "adaln.safetensors"), "--ref", str(ref), "--prompt", "hi",
           "--steps", "2", "--seeds", "3", "--out", str(out), *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    wav, _ = sf.read(out)
    return wav


def test_sample_from_the_run_files_alone(run):
    """The adaln file carries the config that prepared the training data, so the codec, text
    encoder and speaker features are the run's: the same WAV as with that config given by hand."""
    alone = sample(run, run / "alone.wav")
    assert np.isfinite(alone).all() and np.ptp(alone) > 1e-3
    # by hand: micro.yaml plus where the run's sv step wrote its speaker encoder
    config = run / "given.yaml"
    sv = (run / "runs" / "two_sv" / "sv.safetensors").resolve()
    config.write_text((ROOT / "configs" / "micro.yaml").read_text() + f"\nspeaker_paths: {{tiny_sv: '{sv}'}}\n")
    given = sample(run, run / "given.wav", "--config", str(config))
    assert np.array_equal(alone, given)
