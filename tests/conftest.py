"""Shared fixtures: a microscopic corpus prepared once per test session (mel codec, byte text encoder);
the learning test's pipeline, started in the background when that test is collected."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest
import torch

# one intra-op thread: on the shared 2-core machines two threads per process thrash (measured up
# to 10x slower under load); the subprocesses below get OMP_NUM_THREADS=1 for the same reason
torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# settings of the microscopic prepared corpus; train runs on it must repeat them
MICRO = ["--model=micro", "--max_text_len=32", "--mel_n_mels=16", "--speaker_extractors=[mel_stats]"]


def run_py(args, cwd, check=True, timeout=600, env=None):
    """Run one of the repo's scripts with this interpreter; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def micro_corpus(tmp_path_factory):
    """(workdir, data args): a 3-speaker corpus, prepared into workdir/cache."""
    work = tmp_path_factory.mktemp("micro")
    run_py([os.path.join(ROOT, "corpus.py"), "--out", str(work / "corpus"), "--speakers", "3",
            "--utts_per_speaker", "8"], cwd=work)
    args = [f"--manifest={work / 'corpus' / 'train.jsonl'}", f"--val_manifest={work / 'corpus' / 'val.jsonl'}",
            f"--cache_dir={work / 'cache'}", *MICRO]
    run_py([os.path.join(ROOT, "data.py"), "prepare", *args], cwd=work)
    return work, args


# -----------------------------------------------------------------------------------------------
# test_learning.py's pipeline: minutes of training on one thread, started in the background as soon as
# the session knows it will run, so that it trains on the second core while the other tests (one
# thread each) run on the first; its test waits for it. CI's 2 cores: ~4 min less than in turn.

LEARN = os.path.join(ROOT, "configs", "learn.yaml")
_learning = {}  # proc, dir of the background pipeline


def pytest_collection_modifyitems(session, config, items):
    if config.option.collectonly or not any(item.path.name == "test_learning.py" for item in items):
        return
    work = tempfile.mkdtemp(prefix="speakerbox_learn_")
    cmd = [sys.executable, os.path.join(ROOT, "pipeline.py"), LEARN, f"--out_dir={work}/runs",
           f"--corpus_dir={work}/corpus", f"--cache_dir={work}/cache", "--seed=0", "--cpu_threads=1"]
    with open(os.path.join(work, "pipeline.log"), "w") as log:  # the child writes through its own copy
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    _learning.update(proc=proc, dir=work)


def learning_run(timeout=2400):
    """judge.json of the background learning pipeline, once it has finished (its log's tail if it failed)."""
    assert _learning, "the learning pipeline was not started (conftest starts it when test_learning.py is collected)"
    proc, work = _learning["proc"], _learning["dir"]
    proc.wait(timeout=timeout)
    if proc.returncode != 0:
        with open(os.path.join(work, "pipeline.log")) as f:
            raise AssertionError(f"the learning pipeline failed ({proc.returncode}):\n{f.read()[-3000:]}")
    with open(os.path.join(work, "runs", "learn", "judge.json")) as f:
        return json.load(f)


def pytest_sessionfinish(session, exitstatus):
    if _learning:
        if _learning["proc"].poll() is None:  # the session ended early: stop the pipeline and its steps
            os.killpg(_learning["proc"].pid, signal.SIGKILL)
            _learning["proc"].wait()
        shutil.rmtree(_learning["dir"], ignore_errors=True)
