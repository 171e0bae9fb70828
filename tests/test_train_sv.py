"""train_sv.py and the `tiny_sv` extractor: the speaker encoder trained on the run's own voices learns
to tell them apart (beyond what the untrained network does), round-trips through its file, feeds
gradients to the waveform (the ReFL speaker loss), and refuses bad files and manifests by name."""

import json
import os

import pytest
import torch

import files
import speaker
import train_sv
from config import load_config

from conftest import ROOT, run_py


@pytest.fixture(scope="module")
def trained(micro_corpus, tmp_path_factory):
    work, _ = micro_corpus
    out = tmp_path_factory.mktemp("sv")
    argv = [f"--manifest={work / 'corpus' / 'train.jsonl'}", f"--val_manifest={work / 'corpus' / 'val.jsonl'}",
            f"--out_dir={out}", "--name=sv", "--sv_steps=60", "--sv_batch=16", "--sv_dim=32"]
    path, summary = train_sv.main(argv)
    return work, argv, path, summary


def test_trained_encoder_separates_the_voices(trained):
    work, _, path, summary = trained
    train = train_sv.load_clips(work / "corpus" / "train.jsonl")
    val = train_sv.load_clips(work / "corpus" / "val.jsonl")
    net = speaker.load_tiny_sv(path)
    acc, margin, _ = train_sv.identification(net, train, val)
    torch.manual_seed(0)
    untrained = speaker.TinySVNet(dim=32).eval()
    _, margin0, _ = train_sv.identification(untrained, train, val)
    assert not net.training and not untrained.training
    assert acc == 1.0 and summary["val_acc"] == 1.0 and summary["voices"] == sorted(train)
    assert margin > 0.4 and margin > margin0 + 0.3, (margin, margin0)


def test_file_round_trip_fingerprint_and_gradient(trained, tmp_path):
    work, _, path, _ = trained
    meta = files.read_json_metadata(path, "tiny_sv")
    assert meta == {"n_mels": 40, "channels": 192, "dim": 32} and oct(os.stat(path).st_mode & 0o777) == "0o644"
    feats = speaker.build_speaker_extractors(["tiny_sv"], {"tiny_sv": path})
    wav = torch.randn(2, 16000) * 0.1
    emb = feats.embed(wav)
    assert emb.shape == (2, 32) and torch.allclose(emb.norm(dim=-1), torch.ones(2))
    assert torch.equal(emb, speaker.load_tiny_sv(path)(wav))  # eval-mode BatchNorm: the saved statistics
    # differentiable to the waveform, as the ReFL speaker loss needs
    wav.requires_grad_(True)
    feats.embed(wav, differentiable=True).sum().backward()
    assert torch.isfinite(wav.grad).all() and wav.grad.abs().sum() > 0
    # the cache key follows the file's bytes
    other = tmp_path / "sv.safetensors"
    state = files.load_safetensors(path)
    state["embed.bias"] = state["embed.bias"] + 1
    files.save_safetensors(state, other, {"tiny_sv": meta})
    assert speaker.build_speaker_extractors(["tiny_sv"], {"tiny_sv": str(other)}).fingerprint() != feats.fingerprint()


def test_bad_files_and_manifests_are_named(trained, tmp_path):
    work, argv, path, _ = trained
    with pytest.raises(FileNotFoundError, match="train_sv.py"):
        speaker.build_speaker_extractors(["tiny_sv"], {})
    with pytest.raises(FileNotFoundError, match="missing.safetensors does not exist"):
        speaker.load_tiny_sv(str(tmp_path / "missing.safetensors"))
    plain = tmp_path / "plain.safetensors"
    files.save_safetensors({"w": torch.zeros(2)}, plain)
    with pytest.raises(ValueError, match="plain.safetensors is not a train_sv.py file"):
        speaker.load_tiny_sv(str(plain))
    wrong = tmp_path / "wrong.safetensors"
    files.save_safetensors(files.load_safetensors(path), wrong, {"tiny_sv": {"n_mels": 40, "channels": 192, "dim": 64}})
    with pytest.raises(ValueError, match="wrong.safetensors does not match"):
        speaker.load_tiny_sv(str(wrong))
    # an existing encoder is not replaced without --overwrite=true; one line, exit 1
    proc = run_py([os.path.join(ROOT, "train_sv.py"), *argv], cwd=work, check=False)
    assert proc.returncode == 1 and "sv.safetensors exists" in proc.stderr and len(proc.stderr.splitlines()) == 1
    # voices come from speaker labels: a manifest without them is refused, naming the line
    rows = [json.loads(line) for line in open(work / "corpus" / "train.jsonl")]
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text("".join(json.dumps({**r, "audio": str(work / "corpus" / r["audio"]), "speaker": ""}) + "\n"
                                  for r in rows))
    with pytest.raises(ValueError, match=r"unlabelled.jsonl:1: no 'speaker'"):
        train_sv.load_clips(unlabelled)
    with pytest.raises(ValueError, match="at least 2 voices"):
        train_sv.train_sv(load_config(["--sv_steps=1"]), {"a": [torch.randn(16000)]})
