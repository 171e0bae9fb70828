"""audio.py: the resampler against torchaudio, the WAV + sidecar writer read back, and one home
for each shared concept (a second definition creeping back in fails here)."""

import json
import os
import re

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

import audio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# concept: (pattern of a definition, the modules allowed to hold one)
HOMES = {
    "the 16 kHz rate": (r"^\s*\w*(RATE|SR)\w*\s*=\s*16_?000\b", {"audio"}),
    "the dtype table": (r"^\s*DTYPES\s*=", {"files"}),
    # corpus.py keeps its FFT resampler: numpy clips of eSpeak, ~50x cheaper there (its docstring)
    "a resampler": (r"^\s*def \w*resample\w*\(", {"audio", "corpus"}),
    "the file check": (r"^\s*def _?check_file\(", {"files"}),
    "the sigma shift": (r"^\s*def \w*shift_for_tokens\(", {"losses"}),
    "the wav + sidecar writer": (r"\.with_suffix\(\"\.json\"\)\.write_text|splitext\(.*\)\[0\] \+ \"\.json\"",
                                 {"audio"}),
    "the reference peak": (r"^\s*REF_PEAK\s*=", {"audio"}),
}


def test_resample_is_torchaudio_and_a_no_op_at_equal_rates():
    wav = torch.randn(2, 4800, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(audio.resample(wav, 48000, audio.SAMPLE_RATE), AF.resample(wav, 48000, 16000),
                               rtol=0, atol=0)
    assert audio.resample(wav, 16000, 16000) is wav


def test_write_wav_writes_the_clip_and_its_sidecar(tmp_path):
    wav = 0.5 * torch.sin(torch.linspace(0, 200, 8000)).repeat(2, 1)  # (2, N)
    side = audio.write_wav(tmp_path / "a.wav", wav, 24000, {"seed": 3, "ckpt": tmp_path / "m.safetensors"})
    data, rate = sf.read(tmp_path / "a.wav", dtype="float32", always_2d=True)
    assert rate == 24000 and data.shape == (8000, 2)
    np.testing.assert_allclose(data.T, wav.numpy(), atol=1 / 32768)  # PCM16
    assert side == str(tmp_path / "a.json")
    assert json.loads((tmp_path / "a.json").read_text()) == {"seed": 3, "ckpt": str(tmp_path / "m.safetensors")}


def test_each_concept_has_one_home():
    mods = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))
    for concept, (pattern, homes) in HOMES.items():
        rx = re.compile(pattern)
        found = {m for m in mods for line in open(os.path.join(ROOT, m + ".py"), encoding="utf-8") if rx.search(line)}
        assert found <= homes, f"{concept} is defined in {sorted(found - homes)}, beside its home {sorted(homes)}"
        assert found & homes, f"{concept}: not found in {sorted(homes)} (pattern out of date?)"


def test_the_home_check_catches_a_second_definition():
    planted = ["SAMPLE_RATE = 16000", "DTYPES = {}", "def _resample(wav, a, b):", "def _check_file(path):",
               "def shift_for_tokens(n):", 'Path(p).with_suffix(".json").write_text(s)', "REF_PEAK = 0.63"]
    for (concept, (pattern, _)), line in zip(HOMES.items(), planted):
        assert re.search(pattern, line), concept
