"""Stage-2 ReFL overhead projected to the official sizes from pieces timed on this machine.

    python benchmarks/bench_stage2_scale.py            # B=4 micro-batch of 10 s clips, run 8's gate
    python benchmarks/bench_stage2_scale.py --quick    # fewer repeats

A full LTX-2.3 stage-2 step does not fit a CPU benchmark (48 blocks of 68 M params, a 22B checkpoint
we do not have), so its pieces are timed one by one at the official sizes, with random weights:
  dit block    one `ltx23_audio` transformer block (D = 2048, 32 heads, gated attention, 9-row AdaLN),
               forward + backward of B items of T tokens with 128 text tokens; the block's weights
               are frozen, the backward runs for the SpeakerAdaLNZero deltas (requires_grad), as in
               stage 2. The DiT step is 48 of these (plus the cheap patchify/head, left out).
  decode       codec.LTXAudioCodec at the official audio VAE config (tests/data/ltx23) and the LTX-2.3
               16 kHz vocoder sizes (tests/data/ltx23/README.md: 1536 channels, x[5,2,2,2,2,2], AMP + SnakeBeta),
               `decode_16k` with gradient checkpointing (as AuxLosses runs it), forward + backward
               to the latent: of the whole clip, and of the `aux_crop_seconds` middle (default 4 s)
  dnsmos       DNSMOS OVR of one 9.01 s window, forward + backward to the waveform
  wavlm_sv     transformers WavLMForXVector at its default (base) size on the 16 kHz clip (whole
               or cropped), forward + backward to the waveform
AuxLosses decodes and scores `aux_clips` = 1 clip per micro-batch, so one firing micro-batch costs
  fire = (48·block + decode + dnsmos + wavlm_sv) / (48·block)
and with the σ gate a fraction q of micro-batches fires: amortised = 1 + q·(fire − 1).
All pieces run once per round, the order flipping every round (timing.py), and `fire` is computed
per round from that round's pieces: the median and spread of those per-round ratios are reported
with the load average before and after.
These are CPU ratios: on a GPU the DiT's matmuls run closer to peak than the codec's convolutions,
so the GPU ratio is expected higher than this projection; measure there before trusting it.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import codec as codec_lib  # noqa: E402
import dnsmos as dnsmos_lib  # noqa: E402
import losses  # noqa: E402
import model as model_lib  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # noqa: E402

# LTX-2.3 vocoder sizes (tests/data/ltx23/README.md): 16 kHz BigVGAN with AMP blocks and SnakeBeta, then BWE to 48 kHz
_AMP = {"resblock": "AMP1", "stereo": True, "activation": "snakebeta", "resblock_kernel_sizes": [3, 7, 11],
        "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]]}
VOCODER_23 = {"vocoder": {**_AMP, "upsample_initial_channel": 1536, "upsample_rates": [5, 2, 2, 2, 2, 2],
                          "upsample_kernel_sizes": [11, 4, 4, 4, 4, 4]},
              "bwe": {**_AMP, "upsample_initial_channel": 512, "upsample_rates": [6, 5, 2, 2, 2],
                      "upsample_kernel_sizes": [12, 11, 4, 4, 4], "input_sampling_rate": 16000,
                      "output_sampling_rate": 48000, "n_fft": 512, "hop_length": 80, "num_mels": 64}}


def dit_block(B, T, text_len=128):
    """Forward + backward closure of one LTX-2.3 audio block on (B, T) tokens, deltas trainable."""
    cfg = model_lib.PRESETS["ltx23_audio"]
    torch.manual_seed(0)
    dit = model_lib.AudioDiT(dataclasses.replace(cfg, num_layers=1)).requires_grad_(False)
    for p in dit.parameters():  # adaLN-zero would make the block an identity: random weights instead
        p.normal_(0, 0.02)
    x = torch.randn(B, T, cfg.in_channels)
    context = torch.randn(B, text_len, cfg.cross_attention_dim)
    sigma = torch.full((B,), 0.3)
    deltas = torch.zeros(B, 1, cfg.ada_rows * cfg.dim, requires_grad=True)

    def step():
        v = dit(x, sigma, context, block_deltas=deltas)
        v.square().mean().backward()
        deltas.grad = None

    return step, sum(p.numel() for p in dit.transformer_blocks.parameters())


def decoders(lengths):
    """({T: forward + backward closure of decode_16k on T tokens}, params used by decode_16k)."""
    with open(os.path.join(ROOT, "tests", "data", "ltx23", "audio_vae_config.json")) as f:
        vae = json.load(f)["audio_vae"]
    torch.manual_seed(0)
    codec = codec_lib.LTXAudioCodec({"audio_vae": vae, "vocoder": VOCODER_23}).eval().requires_grad_(False)
    codec.grad_checkpointing = True

    def closure(T):
        latent = torch.randn(1, T, codec.latent_dim, requires_grad=True)

        def step():
            codec.decode_16k(latent).mean(1).square().mean().backward()
            latent.grad = None
        return step

    n_params = sum(p.numel() for n, p in codec.named_parameters() if not n.startswith(("audio_vae.encoder",
                                                                                     "vocoder.bwe")))
    return {T: closure(T) for T in lengths}, n_params


def dnsmos_window():
    model = dnsmos_lib.DNSMOS()
    wav = (0.1 * torch.randn(1, dnsmos_lib.WINDOW)).requires_grad_(True)

    def step():
        (-model(wav, max_windows=1)["ovr"].mean()).backward()
        wav.grad = None

    return step


def wavlm_sv(lengths):
    """({T: forward + backward closure of WavLM-SV on T tokens' worth of 16 kHz audio}, params)."""
    from transformers import WavLMConfig, WavLMForXVector

    torch.manual_seed(0)
    model = WavLMForXVector(WavLMConfig()).eval().requires_grad_(False)

    def closure(T):
        wav = (0.1 * torch.randn(1, T * 16000 // 25)).requires_grad_(True)

        def step():
            model(wav).embeddings.square().sum().backward()
            wav.grad = None
        return step

    return {T: closure(T) for T in lengths}, sum(p.numel() for p in model.parameters())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4, help="run 8's micro-batch")
    ap.add_argument("--tokens", type=int, default=250, help="target tokens per clip (250 = 10 s, run 8's cap)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--aux_sigma_max", type=float, default=0.4)
    ap.add_argument("--crop_seconds", type=float, default=4.0, help="aux_crop_seconds (run 8's setting)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rounds = 2 if args.quick else 4
    seconds = args.tokens / 25
    lengths = {"whole": args.tokens, "crop": round(args.crop_seconds * 25)}
    block_step, block_params = dit_block(args.batch, args.tokens)
    decode_steps, decode_params = decoders(lengths.values())
    wavlm_steps, wavlm_params = wavlm_sv(lengths.values())
    pieces = {"block": block_step, "dnsmos": dnsmos_window()}
    for k, T in lengths.items():
        pieces[f"decode_{k}"], pieces[f"wavlm_{k}"] = decode_steps[T], wavlm_steps[T]
    load0, t_start = timing.load(), time.perf_counter()
    times = timing.paired_times(pieces, rounds)
    load1 = timing.load()

    layers = model_lib.PRESETS["ltx23_audio"].num_layers
    fire = {k: [(layers * b + d + n + w) / (layers * b) for b, d, n, w in
                zip(times["block"], times[f"decode_{k}"], times["dnsmos"], times[f"wavlm_{k}"])] for k in lengths}
    sigma = losses.sample_sigma(200_000, args.tokens, generator=torch.Generator().manual_seed(0))
    p = (sigma < args.aux_sigma_max).float().mean().item()
    q = 1 - (1 - p) ** args.batch
    t_block = timing.spread(times["block"])[0]
    print(f"torch {torch.__version__}, {args.threads} threads, fp32; B={args.batch} x {args.tokens} tokens "
          f"({seconds:.0f} s clips); {rounds} rounds after 1 warm-up each")
    print(f"  dit block fwd+bwd ({block_params / 1e6:.1f} M params, x {layers} = {layers * t_block:.1f} s): "
          + timing.describe("s", times["block"], fmt=".2f"))
    print("  dnsmos window f+b: " + timing.describe("s", times["dnsmos"], fmt=".2f"))
    print(f"gate σ < {args.aux_sigma_max}: p = {p:.3f} per item, q = {q:.3f} per micro-batch of {args.batch}")
    for k, T in lengths.items():
        med = timing.spread(fire[k])[0]
        print(f"{k} ({T / 25:.0f} s decoded): decode_16k f+b ({decode_params / 1e6:.1f} M params: VAE decoder + "
              f"16 kHz vocoder, checkpointed) " + timing.describe("s", times[f"decode_{k}"], fmt=".2f"))
        print(f"    wavlm_sv f+b ({wavlm_params / 1e6:.1f} M params) "
              + timing.describe("s", times[f"wavlm_{k}"], fmt=".2f"))
        print("    " + timing.describe("projected ratio per firing micro-batch", fire[k])
              + f"; amortised {1 + q * (med - 1):.3f}x (target <= 1.5x)")
    print(timing.load_line(load0, load1, args.threads) + f"; wall {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
