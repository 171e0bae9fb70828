"""DNSMOS P.835 (SIG / BAK / OVR) in PyTorch, differentiable from the 16 kHz waveform to the scores.

A port of the `sig_bak_ovr.onnx` network that the `speechmos` wheel ships (Microsoft's DNS
challenge model, exported from Keras by keras2onnx). The ONNX graph takes raw audio, (N, 144160)
samples = 9.01 s at 16 kHz, and computes its own features, so the whole path lives here:

    frames of 320 samples, hop 160 (900 frames) -> a trained STFT-like front end, two 1x1
    convolutions (161 "real" + 161 "imaginary" bins; the kernels are learned, not a windowed DFT)
    -> power -> log10(max(power, 1e-12))                                    # (N, 1, 900, 161)
    -> 7 conv3x3+ReLU (128, 64, 64, 32, [pool] 32, [pool] 32, [pool] 64) -> global max
    -> dense 128 ReLU -> dense 64 ReLU -> dense 3 = raw (sig, bak, ovr)

Around the network we do what `speechmos.dnsmos.run` does for a clip: repeat the clip until it is
at least 9.01 s long (it doubles the array: `audio = append(audio, audio)`), score 9.01 s windows
at a 1 s hop, map each window's raw scores through the P.835 polynomial fits, and average the mapped
scores over windows. `forward` returns both the mapped scores (`sig`, `bak`, `ovr`: what speechmos
reports as sig_mos / bak_mos / ovrl_mos) and the window-averaged raw network outputs (`*_raw`).
The P.808 model (`p808_mos`, fed librosa mel features) is not ported.

The weights are read from the ONNX file with a ~30-line protobuf wire-format reader rather than the
`onnx` package: we need only the graph's initializers (name, dims, data type, bytes), the
architecture is written out below, and a test checks the result against onnxruntime; that avoids a
runtime dependency (onnx + its pinned protobuf) for reading 20 tensors. `speechmos` itself has no
dependencies, and is needed at run time only for its ONNX files.
"""

import importlib.util
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from audio import SAMPLE_RATE

WINDOW = 144160  # 9.01 s: the ONNX input length (speechmos INPUT_LENGTH 9.01 s at SAMPLE_RATE)
HOP = SAMPLE_RATE  # 1 s between windows, as speechmos
FRAME, FRAME_HOP, FRAMES = 320, 160, 900  # the graph's framing: two crops reshaped to (900, 160)

# P.835 polynomial fits from raw network output to MOS, highest power first (speechmos/dnsmos.py,
# `get_polyfit_val`): ordinary and personalised (pDNSMOS) models.
POLYFITS = {
    False: {"sig": (-0.08397278, 1.22083953, 0.0052439),
            "bak": (-0.13166888, 1.60915514, -0.39604546),
            "ovr": (-0.06766283, 1.11546468, 0.04602535)},
    True: {"sig": (-0.01019296, 0.02751166, 1.19576786, -0.24348726),
           "bak": (-0.04976499, 0.44276479, -0.1644611, 0.96883132),
           "ovr": (-0.00533021, 0.005101, 1.18058466, -0.11236046)},
}

# ONNX initializer name -> shape, in the order the network uses them. Conv kernels are stored OIHW,
# dense kernels (in, out) as Keras writes them.
CONVS = [f"conv2d{'' if i == 0 else f'_{i}'}" for i in range(7)]
CONV_SHAPES = [(128, 1), (64, 128), (64, 64), (32, 64), (32, 32), (32, 32), (64, 32)]
POOL_AFTER = (3, 4, 5)  # 2x2 max-pool (floor) after these convs
DENSES = {"dense": (64, 128), "dense_1": (128, 64), "dense_3": (64, 3)}


def speechmos_model_path(personalized=False):
    """Path of `sig_bak_ovr.onnx` inside the installed speechmos package (not imported: its
    modules import librosa and onnxruntime)."""
    spec = importlib.util.find_spec("speechmos")
    if spec is None:
        raise FileNotFoundError("DNSMOS weights come from the `speechmos` package: pip install speechmos")
    folder = "pdnsmos_models" if personalized else "dnsmos_models"
    return os.path.join(spec.submodule_search_locations[0], folder, "sig_bak_ovr.onnx")


# -----------------------------------------------------------------------------------------------
# minimal ONNX reader: protobuf wire format, ModelProto.graph(7).initializer(5) -> TensorProto


def _varint(buf, i):
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(buf):
    """Yield (field number, wire type, value) of one protobuf message; value is an int or bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _packed_ints(items):
    """Repeated int64 field entries (packed or not) -> list of signed ints."""
    out = []
    for wire, value in items:
        if wire == 0:
            out.append(value)
        else:
            i = 0
            while i < len(value):
                v, i = _varint(value, i)
                out.append(v)
    return [v - (1 << 64) if v >= 1 << 63 else v for v in out]


def read_onnx_initializers(path):
    """{name: np.ndarray} of the float32 and int64 initializers of an ONNX model file."""
    with open(path, "rb") as f:
        model = f.read()
    graph = next((v for n, w, v in _fields(model) if n == 7 and w == 2), None)
    if graph is None:
        raise ValueError(f"{path}: not an ONNX model (no graph)")
    tensors = {}
    for number, wire, tensor in _fields(graph):
        if number != 5:
            continue
        parts = {}
        for n, w, v in _fields(tensor):
            parts.setdefault(n, []).append((w, v))
        name = bytes(parts[8][0][1]).decode()
        dims = _packed_ints(parts.get(1, []))
        dtype = {1: np.float32, 7: np.int64}.get(parts[2][0][1])
        if dtype is None:
            raise ValueError(f"{path}: initializer '{name}' has unsupported ONNX data type {parts[2][0][1]}")
        if 9 in parts:  # raw_data, little-endian
            array = np.frombuffer(bytes(parts[9][0][1]), dtype=np.dtype(dtype).newbyteorder("<"))
        elif dtype is np.float32:  # float_data (packed fixed32, or one float per entry)
            chunks = [np.frombuffer(bytes(v), "<f4") for _, v in parts.get(4, [])]
            array = np.concatenate(chunks) if chunks else np.zeros(0, "<f4")
        else:  # int64_data
            array = np.array(_packed_ints(parts.get(7, [])), dtype=np.int64)
        tensors[name] = array.astype(dtype).reshape(dims)
    return tensors


# -----------------------------------------------------------------------------------------------
# the network


def _initializer(tensors, key, shape, path):
    if key not in tensors:
        raise KeyError(f"{path}: missing initializer '{key}' (not the DNSMOS sig_bak_ovr model?)")
    value = tensors[key]
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{path}: initializer '{key}' has shape {tuple(value.shape)}, expected {tuple(shape)}")
    return torch.from_numpy(value.copy())


class DNSMOS(nn.Module):
    """Frozen DNSMOS P.835 scorer: waveform (B, N) at 16 kHz in [-1, 1] -> dict of (B,) scores.

    Differentiable with respect to the waveform (the stage-2 OVR loss back-propagates through it);
    its own parameters have requires_grad=False. Runs in fp32 even under autocast.
    """

    def __init__(self, path=None, personalized=False):
        super().__init__()
        path = path or speechmos_model_path(personalized)
        self.path, self.personalized = path, personalized
        w = read_onnx_initializers(path)

        # front-end kernels (161 bins, 320 taps, 1): the graph's `time2freq` 1x1 convs over frames
        for part in ("real", "imag"):
            kernel = _initializer(w, f"time2freq/stft-{part}/kernel:0", (161, FRAME, 1), path)
            self.register_buffer(f"stft_{part}", kernel[..., 0])  # (161, 320)
        self.log_floor = float(_initializer(w, "mos_estimator_logpow/Maximum/x:0", (), path))  # 1e-12
        self.log_base = float(_initializer(w, "mos_estimator_logpow/truediv/y:0", (), path))  # ln(10)

        self.convs = nn.ModuleList()
        for key, (cout, cin) in zip(CONVS, CONV_SHAPES):
            conv = nn.Conv2d(cin, cout, 3, padding=1)
            conv.weight.data.copy_(_initializer(w, f"{key}/kernel:0", (cout, cin, 3, 3), path))
            conv.bias.data.copy_(_initializer(w, f"{key}/bias:0", (cout,), path))
            self.convs.append(conv)
        # NHWC convolutions: 0.77x the time of NCHW on a CPU (oneDNN), the same scores to fp32 rounding
        self.convs.to(memory_format=torch.channels_last)
        self.dense = nn.ModuleDict()
        for key, (fin, fout) in DENSES.items():
            linear = nn.Linear(fin, fout)
            prefix = f"mos_estimator_logpow/{key}"
            linear.weight.data.copy_(_initializer(w, f"{prefix}/MatMul/ReadVariableOp/resource:0", (fin, fout), path).T)
            linear.bias.data.copy_(_initializer(w, f"{prefix}/BiasAdd/ReadVariableOp/resource:0", (fout,), path))
            self.dense[key] = linear
        self.requires_grad_(False)
        self.eval()

    def log_power(self, x):
        """(M, 144160) windows -> (M, 1, 900, 161) log10 power spectrogram, as the graph computes it."""
        frames = x.unfold(-1, FRAME, FRAME_HOP)  # (M, 900, 320): the graph's two crops, concatenated
        real = frames @ self.stft_real.T  # (M, 900, 161)
        imag = frames @ self.stft_imag.T
        # The graph takes sqrt then squares it; the power directly is the same value and keeps a
        # finite gradient at 0 (digital silence).
        power = real * real + imag * imag
        return (torch.log(power.clamp(min=self.log_floor)) / self.log_base)[:, None]

    def raw_scores(self, x):
        """(M, 144160) windows -> (M, 3) raw network outputs (sig, bak, ovr)."""
        if x.shape[-1] != WINDOW:
            raise ValueError(f"DNSMOS windows must have {WINDOW} samples, got {x.shape[-1]}")
        h = self.log_power(x)
        for i, conv in enumerate(self.convs):
            h = F.relu(conv(h))
            if i in POOL_AFTER:
                h = F.max_pool2d(h, 2)
        h = h.amax(dim=(2, 3))  # global max pool: (M, 64)
        h = F.relu(self.dense["dense"](h))
        h = F.relu(self.dense["dense_1"](h))
        return self.dense["dense_3"](h)

    def forward(self, wav, max_windows=None):
        """wav (B, N) or (N,) at 16 kHz -> {sig, bak, ovr, sig_raw, bak_raw, ovr_raw}, each (B,).

        Clips shorter than 9.01 s are repeated (doubled until long enough), longer ones scored on
        9.01 s windows every 1 s, as speechmos does; all clips of a batch share one length.
        max_windows: score only the first windows (the ReFL loss uses 1: a short clip's repeats
        make every window nearly the same, at 6x the cost for a 4 s clip).
        """
        if wav.dim() == 1:
            wav = wav[None]
        if wav.dim() != 2 or wav.shape[-1] == 0:
            raise ValueError(f"DNSMOS expects a mono waveform (B, N) with N > 0, got shape {tuple(wav.shape)}")
        with torch.autocast(wav.device.type, enabled=False):
            wav = wav.float()
            while wav.shape[-1] < WINDOW:
                wav = torch.cat([wav, wav], dim=-1)
            starts = window_starts(wav.shape[-1])[:max_windows]
            windows = torch.stack([wav[:, s:s + WINDOW] for s in starts], dim=1)  # (B, W, 144160)
            B, W = windows.shape[:2]
            raw = self.raw_scores(windows.flatten(0, 1)).view(B, W, 3)
            out = {}
            for k, name in enumerate(("sig", "bak", "ovr")):
                out[name] = _polyval(POLYFITS[self.personalized][name], raw[..., k]).mean(1)
                out[f"{name}_raw"] = raw[..., k].mean(1)
        return out


def window_starts(n):
    """Start samples of the 9.01 s windows speechmos scores in a clip of n >= 144160 samples.

    speechmos takes `int(floor(n / 16000) - 9.01) + 1` windows, starting each second, and skips a
    window whose end `int((i + 9.01) * 16000)` rounds one sample short (i = 7..23, 119.., a float
    artefact); we keep exactly its windows so that scores equal speechmos's.
    """
    count = int(math.floor(n / SAMPLE_RATE) - WINDOW / SAMPLE_RATE) + 1
    return [i * HOP for i in range(count)
            if int((i + WINDOW / SAMPLE_RATE) * SAMPLE_RATE) - i * HOP >= WINDOW]


def _polyval(coeffs, x):
    """Horner evaluation of a polynomial with the highest power first (numpy.poly1d order)."""
    y = torch.zeros_like(x)
    for c in coeffs:
        y = y * x + c
    return y
