"""train.py end to end on the microscopic corpus: hand-written DDP equals one process, and a run
killed mid-way and resumed ends bit-identical to an uninterrupted one."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_py

TRAIN = os.path.join(ROOT, "train.py")
COMMON = ["--global_batch=4", "--micro_batch=2", "--dtype=fp32", "--val_every=100", "--log_every=1", "--lr=3e-3"]


def _weights(path):
    return load_file(str(path))


def test_two_process_gloo_equals_one_process(micro_corpus):
    work, data_args = micro_corpus
    args = [*data_args, *COMMON, "--max_steps=3", "--ckpt_every=100", "--device=cpu"]
    run_py([TRAIN, *args, "--name=one"], cwd=work)  # 1 process x 2 micro-steps
    run_py(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN, *args, "--name=two"],
           cwd=work)  # 2 processes x 1 micro-step each, gloo
    run_py([TRAIN, *args, "--name=init", "--max_steps=0"], cwd=work)  # the shared initialisation
    one, two = _weights(work / "runs/one/dit.safetensors"), _weights(work / "runs/two/dit.safetensors")
    init = _weights(work / "runs/init/dit.safetensors")
    assert one.keys() == two.keys() == init.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=2e-6, msg=k)
    moved = max((one[k] - init[k]).abs().max().item() for k in one)
    assert moved > 1e-3, "3 steps at lr 3e-3 should move the weights"


def _train_cmd(data_args, name, extra=()):
    return [sys.executable, TRAIN, *data_args, *COMMON, "--max_steps=8", "--ckpt_every=2", f"--name={name}",
            "--stage=base", *extra]


def test_killed_run_resumes_bit_identical(micro_corpus):
    work, data_args = micro_corpus
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_train_cmd(data_args, "full"), cwd=work, env=env, check=True, capture_output=True)
    ckpt = work / "runs/killed/checkpoint.pt"
    proc = subprocess.Popen(_train_cmd(data_args, "killed"), cwd=work, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: only the atomic checkpoint survives
    proc.wait()
    assert ckpt.exists(), "the run never wrote a checkpoint"
    killed_at = torch.load(ckpt, map_location="cpu", weights_only=False)["step"]
    assert killed_at < 8, "the run finished before it could be killed"
    assert not (work / "runs/killed/dit.safetensors").exists()
    subprocess.run(_train_cmd(data_args, "killed", ["--resume=true"]), cwd=work, env=env, check=True,
                   capture_output=True)
    full, resumed = _weights(work / "runs/full/dit.safetensors"), _weights(work / "runs/killed/dit.safetensors")
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    assert torch.load(work / "runs/full/checkpoint.pt", map_location="cpu", weights_only=False)["step"] == 8


def test_stop_file_stops_all_ranks_with_a_checkpoint(micro_corpus):
    work, data_args = micro_corpus
    run_dir = work / "runs/stopped"
    run_dir.mkdir(parents=True)
    (run_dir / "STOP").write_text("")
    out = run_py([TRAIN, *data_args, *COMMON, "--max_steps=50", "--ckpt_every=100", "--name=stopped"], cwd=work)
    assert "stopped at step 1" in out.stdout
    assert torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)["step"] == 1
    assert not (run_dir / "STOP").exists()  # honoured once: --resume continues
    out = run_py([TRAIN, *data_args, *COMMON, "--max_steps=3", "--ckpt_every=100", "--name=stopped",
                  "--resume=true"], cwd=work)
    assert "resumed from" in out.stdout and "done: 3 steps" in out.stdout


@pytest.fixture(scope="module")
def lora_base(micro_corpus):
    """A 2-step base DiT for the stage-1 tests."""
    work, data_args = micro_corpus
    run_py([TRAIN, *data_args, *COMMON, "--max_steps=2", "--ckpt_every=100", "--name=lora_base"], cwd=work)
    return work / "runs/lora_base/dit.safetensors"


def test_lora_stage_bf16_masters_two_processes_equal_one(micro_corpus, lora_base):
    """Stage 1 on a bf16 frozen base with fp32 master weights: 2 gloo ranks = 1 process."""
    work, data_args = micro_corpus
    args = [*data_args, *COMMON, "--max_steps=3", "--ckpt_every=100", "--device=cpu", "--stage=lora",
            f"--ckpt={lora_base}", "--lora_rank=4", "--lora_alpha=8", "--lora_targets=[audio]", "--param_dtype=bf16",
            "--dtype=bf16"]
    run_py([TRAIN, *args, "--name=lora_one"], cwd=work)
    run_py(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN, *args, "--name=lora_two"],
           cwd=work)
    one, two = _weights(work / "runs/lora_one/lora.safetensors"), _weights(work / "runs/lora_two/lora.safetensors")
    assert one.keys() == two.keys() and any(k.endswith("lora_B.weight") for k in one)
    for k in one:
        torch.testing.assert_close(two[k].float(), one[k].float(), rtol=1e-3, atol=1e-5, msg=k)
    # B starts at zero: after 3 steps it has moved in every adapter (the masters kept the updates)
    assert all(one[k].abs().max() > 0 for k in one if k.endswith("lora_B.weight"))


def test_stage2_two_processes_equal_one_with_aux_coefficients(micro_corpus):
    """Stage 2 with the ReFL speaker loss: the adaptive coefficients' EMAs see the step's losses
    averaged over every micro-batch of every rank, so 2 gloo ranks = 1 process, EMAs included."""
    work, data_args = micro_corpus
    base = work / "runs/s2_base/dit.safetensors"
    run_py([TRAIN, *data_args, *COMMON, "--max_steps=2", "--ckpt_every=100", "--name=s2_base"], cwd=work)
    args = [*data_args, *COMMON, "--max_steps=3", "--ckpt_every=100", "--device=cpu", "--stage=adaln",
            f"--ckpt={base}", "--aux_losses=[speaker]", "--aux_ratios={speaker: 0.5}", "--aux_sigma_max=1.0",
            "--aux_clips=2", "--speaker_dropout=0", "--griffin_lim_iters=2", "--clone_probs=[0,0,1]"]
    run_py([TRAIN, *args, "--name=s2_one"], cwd=work)
    run_py(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN, *args, "--name=s2_two"],
           cwd=work)
    one = torch.load(work / "runs/s2_one/checkpoint.pt", map_location="cpu", weights_only=False)
    two = torch.load(work / "runs/s2_two/checkpoint.pt", map_location="cpu", weights_only=False)
    assert one["aux"]["ema"]["speaker"] is not None and one["aux"]["dropped"] == {"speaker": 0}
    assert two["aux"]["ema"]["speaker"] == pytest.approx(one["aux"]["ema"]["speaker"], rel=1e-5)
    assert two["aux"]["ema_flow"] == pytest.approx(one["aux"]["ema_flow"], rel=1e-5)
    for k, v in one["trainable"].items():
        torch.testing.assert_close(two["trainable"][k], v, rtol=1e-4, atol=1e-6, msg=k)
    assert any(v.abs().max() > 0 for k, v in one["trainable"].items() if ".heads." in k)  # the AdaLN learned


def test_adaln_lr_scale_steps_the_stage1_adaln_at_its_own_rate(micro_corpus, lora_base):
    """A speaker-aware stage 1 with adaln_lr_scale 2 at lr L moves the AdaLN exactly as lr 2L does with
    scale 1 (the first step's gradients are the same), and the LoRA as lr L does, not 2L."""
    work, data_args = micro_corpus
    args = [*data_args, *COMMON, "--max_steps=1", "--ckpt_every=100", "--stage=lora", f"--ckpt={lora_base}",
            "--lora_rank=4", "--lora_alpha=8", "--lora_targets=[audio]", "--lora_speaker=true", "--adaln_hidden=16"]
    run_py([TRAIN, *args, "--lr=1e-3", "--adaln_lr_scale=2", "--name=adaln_lr_scaled"], cwd=work)
    run_py([TRAIN, *args, "--lr=2e-3", "--name=adaln_lr_double"], cwd=work)
    scaled, double = (work / "runs/adaln_lr_scaled", work / "runs/adaln_lr_double")
    adaln_a, adaln_b = _weights(scaled / "adaln.safetensors"), _weights(double / "adaln.safetensors")
    assert adaln_a.keys() == adaln_b.keys() and any(v.abs().max() > 0 for v in adaln_a.values())
    for k in adaln_a:
        torch.testing.assert_close(adaln_a[k], adaln_b[k], rtol=1e-5, atol=1e-8, msg=k)
    lora_a, lora_b = _weights(scaled / "lora.safetensors"), _weights(double / "lora.safetensors")
    moved = [k for k in lora_a if k.endswith("lora_B.weight")]
    assert moved and all(lora_b[k].abs().max() > 1.5 * lora_a[k].abs().max() for k in moved)  # B from 0: 2x the step
    # its checkpoint's optimizer has two parameter groups: resumed with scale 1 (one group) it is refused
    proc = run_py([TRAIN, *args, "--max_steps=2", "--lr=1e-3", "--resume=true", "--name=adaln_lr_scaled"], cwd=work,
                  check=False)
    err = proc.stderr.strip()
    assert proc.returncode == 1 and len(err.splitlines()) == 1 and "Traceback" not in err, (proc.returncode, err)
    assert "checkpoint.pt" in err and "optimizer state does not fit" in err, err
