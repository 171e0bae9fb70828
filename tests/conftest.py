"""Shared fixtures: a microscopic corpus prepared once per test session (mel codec, byte text encoder);
the learning test's pipeline and the 2-process micro run, started in the background when their test
files are collected."""

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
# Background runs: the two longest subprocess runs of the suite start as soon as pytest has collected
# the file that needs them, so that they use the second core while the other tests (one thread each)
# run on the first; their tests run last and wait for them. test_learning.py's pipeline (minutes of
# training on one thread) and test_run_outputs.py's 2-process micro run: CI on 2 cores took 24:58 with
# both in turn, 20:43 with the pipeline in the background and 21:07 with both on a slower day, when the
# learning tests still waited 162 s for it mid-suite (hence the reordering).

LEARN = os.path.join(ROOT, "configs", "learn.yaml")


def _learning_cmd(work):
    return [sys.executable, os.path.join(ROOT, "pipeline.py"), LEARN, f"--out_dir={work}/runs",
            f"--corpus_dir={work}/corpus", f"--cache_dir={work}/cache", "--seed=0", "--cpu_threads=1"]


def _two_processes_cmd(work):
    return ["bash", os.path.join(ROOT, "run.sh"), "--gpus", "2", "--cpu", os.path.join(ROOT, "configs", "micro.yaml"),
            "--pipeline=[corpus,sv,prepare,base,lora,merge,adaln]", f"--out_dir={work}/runs",
            f"--corpus_dir={work}/corpus", f"--cache_dir={work}/cache", "--name=two"]


BACKGROUND = {"test_learning.py": ("learning", _learning_cmd),  # test file -> (run name, its command)
              "test_run_outputs.py": ("two_processes", _two_processes_cmd)}
_background = {}  # name -> (proc, dir) of the runs started


def pytest_collection_modifyitems(session, config, items):
    if config.option.collectonly:
        return
    # the tests that wait for a background run go last: the other tests run while it trains, not after
    items.sort(key=lambda item: item.path.name in BACKGROUND)
    for file in dict.fromkeys(item.path.name for item in items):
        if file in BACKGROUND:
            name, command = BACKGROUND[file]
            work = tempfile.mkdtemp(prefix=f"speakerbox_{name}_")
            with open(os.path.join(work, "run.log"), "w") as log:  # the child writes through its own copy
                proc = subprocess.Popen(command(work), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
            _background[name] = (proc, work)


def background_run(name, timeout=2400):
    """The directory of the background run `name` once it has finished (its log's tail if it failed)."""
    assert name in _background, f"the {name} run was not started (conftest starts it when its test file is collected)"
    proc, work = _background[name]
    proc.wait(timeout=timeout)
    if proc.returncode != 0:
        with open(os.path.join(work, "run.log")) as f:
            raise AssertionError(f"the {name} run failed ({proc.returncode}):\n{f.read()[-3000:]}")
    return work


def learning_run():
    """judge.json of the background learning pipeline (`python pipeline.py configs/learn.yaml --seed=0
    --cpu_threads=1`)."""
    with open(os.path.join(background_run("learning"), "runs", "learn", "judge.json")) as f:
        return json.load(f)


def pytest_sessionfinish(session, exitstatus):
    for proc, work in _background.values():
        if proc.poll() is None:  # the session ended early: stop the run and its steps
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)
