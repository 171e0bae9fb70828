"""files.py: atomic writes, safetensors with metadata and a mode others can read, clear errors for
damaged / foreign / NaN files, torch files without pickle; SpeakerAdaLNZero files; complete DiT
metadata for ltx-core; LoRA metadata without local paths."""

import json
import os
import pickle
import stat
import sys

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import adaln  # noqa: E402
import files  # noqa: E402
import lora  # noqa: E402
import model as M  # noqa: E402


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# -----------------------------------------------------------------------------------------------
# writing


def test_safetensors_round_trip_metadata_and_mode(tmp_path):
    path = tmp_path / "a.safetensors"
    files.save_safetensors({"x": torch.arange(6.0).view(2, 3), "n": torch.arange(3)}, path,
                           metadata={"name": "a", "shape": {"rows": 2}})
    assert mode(path) == 0o644  # safetensors' own save_file writes 0600: unreadable for another user
    assert files.read_safetensors_metadata(path) == {"name": "a", "shape": '{"rows": 2}'}
    assert files.read_json_metadata(path, "shape") == {"rows": 2}
    got = files.load_safetensors(path)
    assert torch.equal(got["x"], torch.arange(6.0).view(2, 3)) and torch.equal(got["n"], torch.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temp file left


def test_atomic_write_keeps_the_old_file_and_no_temp_on_failure(tmp_path):
    path = tmp_path / "keep.txt"
    files.write_text(path, "old")

    def half_then_crash(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.atomic_write(path, half_then_crash)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_nonfinite_tensor_is_never_written(tmp_path):
    path = tmp_path / "w.safetensors"
    with pytest.raises(files.BadFile, match=r"w\.safetensors.*'b'.*NaN"):
        files.save_safetensors({"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])}, path)
    assert not path.exists() and not list(tmp_path.iterdir())


# -----------------------------------------------------------------------------------------------
# reading: one clear error naming the file


def bad_files(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"a": torch.ones(64)}, str(good), metadata={"config": "{}"})
    data = good.read_bytes()
    made = {"text": b"hello, this is a text file, not weights\n" * 3, "short": b"abc", "empty": b"",
            "truncated": data[:-40], "bogus_length": (2 ** 62).to_bytes(8, "little") + b"{}"}
    paths = {}
    for name, content in made.items():
        paths[name] = tmp_path / f"{name}.safetensors"
        paths[name].write_bytes(content)
    nan = tmp_path / "nan.safetensors"
    save_file({"ok": torch.ones(2), "bad": torch.tensor([float("inf")])}, str(nan))
    paths["nan"] = nan
    return paths


@pytest.mark.parametrize("name, message", [
    ("text", "not a safetensors file"), ("short", "too short"), ("empty", "too short"),
    ("truncated", "truncated"), ("bogus_length", "not a safetensors file, or truncated"), ("nan", "'bad' holds NaN or Inf"),
])
def test_damaged_safetensors_name_the_file(tmp_path, name, message):
    path = bad_files(tmp_path)[name]
    with pytest.raises(files.BadFile, match=message) as e:
        files.load_safetensors(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        files.load_safetensors(tmp_path / "nope.safetensors")


class Boom:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ.get("BOOM_MARK", "/tmp/boom"),))


def test_torch_load_refuses_code_and_names_damage(tmp_path, monkeypatch):
    mark = tmp_path / "ran"
    monkeypatch.setenv("BOOM_MARK", str(mark))
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": Boom()}, evil)
    with pytest.raises(files.BadFile, match=r"evil\.pt is a pickle with code/objects we do not load"):
        files.torch_load(evil)
    assert not mark.exists()  # nothing ran
    plain = tmp_path / "plain.pt"
    with open(plain, "wb") as f:
        pickle.dump(Boom(), f)
    with pytest.raises(files.BadFile, match="plain.pt"):
        files.torch_load(plain)
    assert not mark.exists()
    ok = tmp_path / "ok.pt"
    files.torch_save({"w": torch.ones(3), "step": 4, "names": ["a"]}, ok)
    assert files.torch_load(ok)["step"] == 4 and mode(ok) == 0o644
    cut = tmp_path / "cut.pt"
    cut.write_bytes(ok.read_bytes()[:100])
    with pytest.raises(files.BadFile, match="cut.pt: not a readable torch file"):
        files.torch_load(cut)


# -----------------------------------------------------------------------------------------------
# artefacts built on files.py


def test_adaln_safetensors_round_trip_with_metadata(tmp_path):
    torch.manual_seed(0)
    net = adaln.SpeakerAdaLNZero(5, num_blocks=2, dim=4, rows=9, hidden=8)
    for head in net.heads:
        torch.nn.init.normal_(head.weight)
    path = tmp_path / "adaln.safetensors"
    cfg = {"speaker_extractors": ["mel_stats"], "seed": 3}
    adaln.save_adaln(net, path, config=cfg, data_config={"seed": 1}, speaker_fingerprint="abc")
    back, meta = adaln.load_adaln(path)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in net.state_dict().items())
    assert meta["adaln"] == {"in_dim": 5, "num_blocks": 2, "dim": 4, "rows": 9, "hidden": 8}
    assert meta["config"] == cfg and meta["data_config"] == {"seed": 1} and meta["speaker_fingerprint"] == "abc"
    assert meta["speaker_extractors"] == ["mel_stats"] and mode(path) == 0o644
    # an older adaln.pt is still read when it holds nothing but tensors and plain values
    old = tmp_path / "adaln.pt"
    torch.save({"state_dict": net.state_dict(), "config": cfg}, old)
    back, meta = adaln.load_adaln(old, rows=9)
    assert torch.equal(back.heads[1].weight, net.heads[1].weight) and meta["config"] == cfg


def test_save_dit_metadata_loads_in_ltx_core(tmp_path):
    """An audio-video checkpoint written by save_dit (and merged by merge.py, which keeps the base's
    metadata) builds through ltx-core's own configurator and loads every weight."""
    from ltx_core.loader.single_gpu_model_builder import SingleGPUModelBuilder
    from ltx_core.model.transformer import LTXV_MODEL_COMFY_RENAMING_MAP, LTXModelConfigurator

    import merge

    torch.manual_seed(0)
    av = M.AudioDiT(M.PRESETS["micro_av"])
    path = tmp_path / "av.safetensors"
    M.save_dit(av, path)
    lora.inject_lora(av, ["audio_attn1"], rank=2, alpha=2)
    for _, m in lora.lora_modules(av):
        torch.nn.init.normal_(m.lora_B.weight)
    lora.save_lora(av, tmp_path / "l.safetensors", base_model_id="micro_av")
    merge.merge_checkpoint(path, tmp_path / "l.safetensors", tmp_path / "merged.safetensors", dtype="keep")
    lora.merge_lora(av)
    for file in (path, tmp_path / "merged.safetensors"):
        ref = SingleGPUModelBuilder(LTXModelConfigurator, str(file), model_sd_ops=LTXV_MODEL_COMFY_RENAMING_MAP).build(
            device=torch.device("cpu"), dtype=torch.float32)
        theirs = ref.state_dict()
        assert not any(t.is_meta for t in theirs.values())
        if file == path:
            assert theirs.keys() == M.AudioDiT(M.PRESETS["micro_av"]).state_dict().keys()
        else:
            ours = av.state_dict()
            assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_lora_metadata_names_no_local_path(tmp_path):
    dit = M.AudioDiT(M.PRESETS["micro"])
    ckpt = tmp_path / "secret_dir" / "base.safetensors"
    ckpt.parent.mkdir()
    M.save_dit(dit, ckpt)
    lora.inject_lora(dit, ["audio_attn1"], rank=2, alpha=2)
    out = tmp_path / "lora.safetensors"
    lora.save_lora(dit, out, base_model_id=str(ckpt))
    meta = files.read_safetensors_metadata(out)
    assert meta["base_model"] == "base.safetensors" and len(meta["base_model_digest"]) == 16
    assert "secret_dir" not in json.dumps(meta) and mode(out) == 0o644 and mode(ckpt) == 0o644
