"""The CUDA paths, each against the CPU run it must agree with: data preparation on the GPU, training
in fp32 and under bf16 autocast (batches through pinned memory), a stopped run resumed on the GPU,
stage 1 on bf16 weights with fp32 masters in pinned host memory, sampling (Euler steps and the
Griffin-Lim decode) and sample.py's bf16 default. Skipped on machines without a GPU (CI has none);
run them where one is: `python -m pytest -q tests/test_cuda.py -s` prints each measured gap.

NCCL is not covered: with one rank train.py starts no process group, and two ranks cannot share one
GPU in an NCCL communicator; the hand-written all-reduce is checked on gloo (tests/test_train.py).
"""

import copy
import json
import os

import pytest
import soundfile as sf
import torch
from safetensors.torch import load_file

from audio import read_mono16k
from conftest import ROOT, run_py

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TRAIN, DATA, SAMPLE = (os.path.join(ROOT, f) for f in ("train.py", "data.py", "sample.py"))
COMMON = ["--global_batch=4", "--micro_batch=2", "--val_every=100", "--log_every=1", "--lr=3e-3",
          "--ckpt_every=100"]


def rel(a, b):
    """‖a − b‖ / ‖b‖ in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def report(name, value):
    print(f"\nCUDA-CHECK {name} = {value}")


def metrics(run_dir):
    """The training steps' lines of a run's metrics.jsonl (validation lines carry no learning rate)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "lr" in r]


def loss_gap(run_dir, ref_dir):
    """The largest relative gap between two runs' training losses, step by step."""
    return max(abs(g["loss"] - c["loss"]) / c["loss"] for g, c in zip(metrics(run_dir), metrics(ref_dir)))


def flat(tensors):
    """A file's tensors as one float64 vector, in key order."""
    return torch.cat([tensors[k].double().flatten() for k in sorted(tensors)])


def test_prepare_on_cuda_equals_the_cpu_cache(micro_corpus):
    """The codec (STFT, mel) and the speaker features on the GPU: the cache's tensors equal the CPU's
    to fp32 rounding, item for item; the text features to bf16 rounding (encoders.py runs the text
    encoder in bf16 on a GPU)."""
    work, data_args = micro_corpus
    caches = {}
    for dev in ("cpu", "cuda"):
        args = [a for a in data_args if not a.startswith("--cache_dir")]
        run_py([DATA, "prepare", *args, f"--cache_dir={work / f'cache_{dev}'}", f"--device={dev}"], cwd=work)
        caches[dev] = {p.name: load_file(str(p)) for p in sorted((work / f"cache_{dev}" / "train" / "items").iterdir())}
    assert caches["cpu"].keys() == caches["cuda"].keys() and len(caches["cpu"]) >= 8
    worst = {}
    for name, cpu in caches["cpu"].items():
        gpu = caches["cuda"][name]
        assert cpu.keys() == gpu.keys(), name
        for k in cpu:
            assert gpu[k].shape == cpu[k].shape and gpu[k].dtype == cpu[k].dtype, (name, k)
            worst[k] = max(worst.get(k, 0.0), rel(gpu[k], cpu[k]))
    report("prepare cuda vs cpu (worst relative error per tensor)", worst)
    assert worst["latent"] < 1e-4 and worst["speaker"] < 1e-4 and worst["text"] < 2e-2, worst


@pytest.fixture(scope="module")
def trained(micro_corpus):
    """Three base-stage steps from the same initialisation: CPU fp32, CUDA fp32, CUDA bf16 autocast."""
    work, data_args = micro_corpus
    runs = {"cpu": ["--device=cpu", "--dtype=fp32"], "cuda": ["--device=cuda", "--dtype=fp32"],
            "cuda_bf16": ["--device=cuda", "--dtype=bf16", "--param_dtype=fp32"]}
    for name, extra in runs.items():
        run_py([TRAIN, *data_args, *COMMON, "--max_steps=3", f"--name=gpu_{name}", *extra], cwd=work)
    return work, data_args, {name: work / "runs" / f"gpu_{name}" for name in runs}


def test_cuda_training_follows_the_cpu_run(trained):
    """Same batches, same noise (drawn on the CPU): fp32 on the GPU reproduces the CPU's losses and
    weights to float rounding; bf16 autocast stays within a few percent of them."""
    _, _, runs = trained
    logs = {name: metrics(d) for name, d in runs.items()}
    assert [r["step"] for r in logs["cuda"]] == [r["step"] for r in logs["cpu"]] == [1, 2, 3]
    fp32_gap, bf16_gap = loss_gap(runs["cuda"], runs["cpu"]), loss_gap(runs["cuda_bf16"], runs["cpu"])
    norm_gap = abs(logs["cuda"][0]["grad_norm"] - logs["cpu"][0]["grad_norm"]) / logs["cpu"][0]["grad_norm"]
    assert all("mem_gb" in r for r in logs["cuda"]) and not any("mem_gb" in r for r in logs["cpu"])
    weights = {name: load_file(str(d / "dit.safetensors")) for name, d in runs.items()}
    assert all(w[k].dtype == torch.float32 for w in weights.values() for k in w)
    vec = {name: flat(w) for name, w in weights.items()}
    w_gap, w_bf16 = rel(vec["cuda"], vec["cpu"]), rel(vec["cuda_bf16"], vec["cpu"])
    report("train loss gap cuda fp32 / bf16 vs cpu", (fp32_gap, bf16_gap))
    report("train first grad-norm gap / weight gap fp32 / bf16", (norm_gap, w_gap, w_bf16))
    assert fp32_gap < 1e-4 and norm_gap < 1e-3 and w_gap < 1e-4
    assert bf16_gap < 0.05 and w_bf16 < 0.05 and torch.isfinite(vec["cuda_bf16"]).all()


def test_stopped_run_resumes_on_cuda_to_the_uninterrupted_result(trained):
    work, data_args, runs = trained
    run_dir = work / "runs" / "gpu_stopped"
    run_dir.mkdir(parents=True)
    (run_dir / "STOP").write_text("")
    args = [TRAIN, *data_args, *COMMON, "--device=cuda", "--dtype=fp32", "--name=gpu_stopped"]
    assert "stopped at step 1" in run_py([*args, "--max_steps=3"], cwd=work).stdout
    assert "resumed from" in run_py([*args, "--max_steps=3", "--resume=true"], cwd=work).stdout
    full, resumed = load_file(str(runs["cuda"] / "dit.safetensors")), load_file(str(run_dir / "dit.safetensors"))
    exact = all(torch.equal(full[k], resumed[k]) for k in full)
    worst = max(rel(resumed[k], full[k]) for k in full)
    report("resume on cuda: bit-identical / worst relative gap", (exact, worst))
    assert full.keys() == resumed.keys() and worst < 1e-6


def test_master_weights_live_in_pinned_host_memory():
    import config
    import train

    params = [torch.nn.Parameter(torch.randn(64, 32, device="cuda", dtype=torch.bfloat16)) for _ in range(2)]
    cfg = config.load_config(["--lr=1e-2"])
    masters, optimizer = train.make_optimizer(cfg, params)
    assert all(m.device.type == "cpu" and m.is_pinned() and m.dtype == torch.float32 for m in masters.masters)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    train.optimizer_step(optimizer, params, masters, grad_clip=1.0)
    torch.cuda.synchronize()
    for p, b, m in zip(params, before, masters.masters):
        assert p.dtype == torch.bfloat16 and torch.equal(p.detach().cpu(), m.detach().to(torch.bfloat16))
        assert (p.detach() < b).float().mean() > 0.99  # a positive gradient moved every weight down


def test_lora_stage_on_bf16_weights_matches_the_cpu(trained):
    """Stage 1 with bf16 base weights, bf16 autocast and fp32 masters (pinned on the GPU run)."""
    work, data_args, runs = trained
    base = runs["cpu"] / "dit.safetensors"
    args = [TRAIN, *data_args, *COMMON, "--max_steps=3", "--stage=lora", f"--ckpt={base}", "--lora_rank=4",
            "--lora_alpha=8", "--lora_targets=[audio]", "--param_dtype=bf16", "--dtype=bf16"]
    for dev in ("cpu", "cuda"):
        run_py([*args, f"--device={dev}", f"--name=gpu_lora_{dev}"], cwd=work)
    cpu, gpu = (load_file(str(work / "runs" / f"gpu_lora_{d}" / "lora.safetensors")) for d in ("cpu", "cuda"))
    assert cpu.keys() == gpu.keys() and any(k.endswith("lora_B.weight") for k in cpu)
    assert all(gpu[k].abs().max() > 0 for k in gpu if k.endswith("lora_B.weight"))
    gap, losses = rel(flat(gpu), flat(cpu)), loss_gap(work / "runs/gpu_lora_cuda", work / "runs/gpu_lora_cpu")
    report("lora bf16 cuda vs cpu: adapter gap / loss gap", (gap, losses))
    assert gap < 0.1 and losses < 0.05


def test_sampling_on_cuda_matches_the_cpu(trained):
    """The Euler sampler with every guidance pass, then the Griffin-Lim decode, on the GPU, each
    from the CPU's inputs: fp32 reproduces the CPU's latents and audio to rounding, bf16 stays near;
    then the whole of sample.py on each device (bf16, the CLI's default on a GPU)."""
    import sample as sample_cli
    import sampler

    work, _, runs = trained
    cfg_path = runs["cpu"] / "config.json"
    args = sample_cli.parse_args(["--ckpt", str(runs["cpu"] / "dit.safetensors"), "--config", str(cfg_path)])
    model, codec, text_encoder, connector, _, _ = sample_cli.load_pipeline(args, "cpu", torch.float32)
    feats, mask = text_encoder.encode(["A calm voice. 'Hello there.'", "Shouted. 'Stop!'", ""])
    ctx = connector(feats, mask).float()
    noise = torch.randn(2, 25, model.cfg.in_channels, generator=torch.Generator().manual_seed(3))
    kw = dict(sigmas=sampler.ltx2_sigmas(6), cfg=3.0, stg=1.0, stg_blocks=(model.cfg.stg_block,), rescale=0.7)
    with torch.no_grad():
        want = sampler.denoise(model, noise, ctx[:2], ctx[2:].expand(2, -1, -1), **kw)
        gpu = {torch.float32: copy.deepcopy(model).cuda(), torch.bfloat16: copy.deepcopy(model).cuda().bfloat16()}
        got = {dtype: sampler.denoise(m, noise.cuda(), ctx[:2].cuda(), ctx[2:].expand(2, -1, -1).cuda(), dtype=dtype,
                                      **kw) for dtype, m in gpu.items()}
        # Griffin-Lim's momentum (0.99) magnifies rounding ~1e4-fold over 16 iterations (a 1e-6 nudge of
        # the latents moves the waveform by ~1 %): the decode is compared without iterations, where it is a
        # continuous map, and with them by how well a real clip's round trip re-encodes on each device
        iters, codec.griffin_lim_iters = codec.griffin_lim_iters, 0
        plain = (codec.decode(want), codec.cuda().decode(want.cuda()))
        codec.griffin_lim_iters = iters
        clip = codec.cpu().encode(read_mono16k(str(sorted((work / "corpus" / "wavs").rglob("*.wav"))[0]))[None, None])
        wavs = (codec.decode(clip), codec.cuda().decode(clip.cuda()).cpu())
        codec.cpu()
        consistency = [rel(codec.encode(w), clip) for w in wavs]
    gaps = (rel(got[torch.float32], want), rel(got[torch.bfloat16], want), rel(plain[1], plain[0]))
    report("sampling on cuda vs cpu: latents fp32 / bf16, decode without iterations", gaps)
    report("real clip decoded with iterations: waveform gap; re-encoding error cpu / cuda",
           (rel(wavs[1], wavs[0]), consistency))
    assert wavs[1].shape == wavs[0].shape and torch.isfinite(got[torch.bfloat16]).all()
    assert gaps[0] < 1e-4 and gaps[1] < 0.1 and gaps[2] < 1e-4, gaps
    assert abs(consistency[1] - consistency[0]) < 0.1 * consistency[0], consistency

    for dev in ("cpu", "cuda"):
        run_py([SAMPLE, "--ckpt", str(runs["cpu"] / "dit.safetensors"), "--config", str(cfg_path), "--steps=4",
                "--prompt", "A calm voice. 'Hello there.'", f"--device={dev}", "--duration=1",
                "--out", str(work / f"gpu_cli_{dev}.wav")], cwd=work)
    (a, sr_a), (b, sr_b) = (sf.read(str(work / f"gpu_cli_{d}.wav")) for d in ("cpu", "cuda"))
    report("sample.py bf16 on cuda vs fp32 on cpu: audio gap", rel(torch.from_numpy(b), torch.from_numpy(a)))
    assert sr_a == sr_b and a.shape == b.shape and torch.isfinite(torch.from_numpy(b)).all() and abs(b).max() > 0
