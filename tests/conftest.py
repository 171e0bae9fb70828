"""Shared fixtures: a microscopic corpus prepared once per test session (mel codec, byte text encoder)."""

import os
import subprocess
import sys

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
