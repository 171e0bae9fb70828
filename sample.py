"""Sample speech from the LTX-2 audio DiT, optionally in the voice of a reference speaker: the
command line, the run config and the loading of every model it needs.

    python sample.py --ckpt merged_dit.safetensors --full_ckpt ltx-2.3-22b-dev.safetensors \
        --adaln adaln.safetensors --ref speaker.wav \
        --prompt "Warm, conversational tone. 'Hello, welcome to the show.'" --out out.wav

The sampling itself lives below this file: sampler.py (σ schedule, guidance, the Euler loop and
`sample()`, also importable from here), av_sampler.py (the joint audio-video model), duration.py
(DramaBox's duration estimate) and reference.py (speaker references).
"""

import argparse
import json
import os
import time

import torch

import audio
import encoders
import files
from av_sampler import sample_av, video_decode_hint, video_latent_shape
from duration import spoken_text
from reference import check_reference
from sampler import DEFAULT_SHIFT_TOKENS, DRAMABOX_SHIFT_TOKENS, REF_MODES, REFERENCE_SIGMA_LAST, sample

# -----------------------------------------------------------------------------------------------
# command line

PRESETS_HELP = """guidance presets (each project's published defaults):
  LTX-2.3 (default)  --cfg 7   --stg 1   --rescale 0.7 --steps 30                  (STG on the model's block, 28)
  DramaBox           --cfg 2.5 --stg 1.5 --rescale 0   --steps 30 --stg_blocks 29 --shift_tokens 128 --ref_mode tokens
                     (its server's automatic rescale is 0.3 at cfg 2.5, and its negative prompt is
                     "worst quality, inconsistent, robotic, distorted, noise, static, muffled, unclear,
                     unnatural, monotone")
  LAIONBox v0.4      --cfg 4.5 --stg 0 --rescale 0 --steps 50 --ref_mode adaln
"""


def add_model_args(p, required=True):
    """Flags that say which weights to load (shared with eval.py)."""
    p.add_argument("--ckpt", required=required, default="",
                   help="DiT safetensors (official, DramaBox, merged, or a train.py dit.safetensors)")
    p.add_argument("--full_ckpt", default="", help="full LTX-2 checkpoint: audio VAE + vocoder, text projection "
                   "and connector (official weights); without it the run config's codec and text stack are used")
    p.add_argument("--config", default="", help="the run's config.json / YAML, so codec, text encoder and speaker "
                   "extractors are built as for its training data (default: the --adaln file's config)")
    p.add_argument("--text_encoder", default="", help="local Gemma 3 directory (default: the run config's)")
    p.add_argument("--lora", default="", help="LoRA safetensors applied to the DiT")
    p.add_argument("--adaln", default="", help="SpeakerAdaLNZero file (adaln.safetensors from train.py)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--dtype", default="bf16", choices=sorted(files.DTYPES), help="compute dtype of the DiT")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def add_guidance_args(p):
    """Sampling flags (shared with eval.py); defaults are LTX-2.3's (ltx-core's pipelines)."""
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--cfg", type=float, default=7.0, help="CFG scale against --negative_prompt (1 = off)")
    p.add_argument("--stg", type=float, default=1.0, help="STG scale (0 = off)")
    p.add_argument("--stg_blocks", default="", help="comma list of blocks whose self-attention STG skips "
                   "(default: the model's, 28 for LTX-2.3)")
    p.add_argument("--rescale", type=float, default=0.7, help="std rescale of the guided x0 (0 = off)")
    p.add_argument("--spk_cfg", type=float, default=1.0, help="speaker guidance scale: conditioned vs the same "
                   "pass without speaker (1 = off)")
    p.add_argument("--spk_sigma", default="0,1", help="LOW,HIGH: σ range of the steps that take speaker guidance "
                   "(0,1 = every step; 0.45,1 for the tiny preset: guidance where the voice is laid down)")
    p.add_argument("--negative_prompt", default="", help="prompt of the CFG negative pass (default empty)")
    p.add_argument("--duration", default="auto", help="'auto' (DramaBox estimate from the prompt) or seconds")
    p.add_argument("--ref_mode", default="adaln", choices=REF_MODES,
                   help="speaker from --ref via SpeakerAdaLNZero deltas, DramaBox reference tokens, both, or none")
    p.add_argument("--shift_tokens", type=int, default=0, help="token count the σ-schedule shift is read from "
                   f"(0: {DEFAULT_SHIFT_TOKENS} as the reference pipelines; DramaBox: {DRAMABOX_SHIFT_TOKENS})")
    p.add_argument("--sigma_last", type=float, default=REFERENCE_SIGMA_LAST,
                   help=f"the last non-zero σ of the schedule, 0-1 ({REFERENCE_SIGMA_LAST} as the reference "
                   "pipelines; 0.02 for the tiny preset, whose mel latents keep the voice's harmonics in detail "
                   "that only the steps below σ 0.1 draw)")
    p.add_argument("--temperature", type=float, default=1.0, help="scale of the starting noise (1 = the "
                   "reference pipelines'; < 1: cleaner, less varied audio from a small model: 0.6 for the tiny preset)")
    p.add_argument("--eta", type=float, default=0.0, help="share of the noise drawn afresh at every step, 0-1 (0 = "
                   "the reference pipelines' deterministic Euler; 0.5 for the tiny preset)")
    p.add_argument("--batch_size", type=int, default=4)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=PRESETS_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--ref", default="", help="reference speaker audio (3-15 s)")
    p.add_argument("--prompt", default="", help="one prompt")
    p.add_argument("--prompts", default="", help="text file, one prompt per line")
    p.add_argument("--seeds", default="42", help="comma list, e.g. 42,123,456")
    p.add_argument("--out", default="", help="output wav (one prompt and one seed)")
    p.add_argument("--out_dir", default="samples", help="output directory otherwise")
    add_guidance_args(p)
    av = p.add_argument_group("audio-video mode (the joint LTX-2 model; writes the audio and the video latents)")
    av.add_argument("--av", action="store_true", help="sample audio and video together from an AV checkpoint")
    av.add_argument("--frames", type=int, default=97, help="video frames, 1 + 8k (97: ~4 s at 24 fps)")
    av.add_argument("--size", default="192x192", help="video WIDTHxHEIGHT in pixels, multiples of 32")
    av.add_argument("--fps", type=float, default=24.0)
    av.add_argument("--video_cfg", type=float, default=3.0, help="CFG scale of the video stream (--cfg: audio's)")
    return p.parse_args(argv)


def compute_dtype(device, name):
    """The DiT's compute dtype: the flag on CUDA; fp32 on the CPU, where bf16 matmuls are emulated."""
    return files.DTYPES[name] if str(device).startswith("cuda") else torch.float32


def resolve_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name}: CUDA is not available")
    return name


def read_config_file(path):
    """The config dict of `--config`: a run's config.json (its "config" entry, or the whole object)
    or a YAML mapping; one clear error for anything else."""
    from config import read_yaml

    files.check_file(path, "--config")
    if not path.endswith(".json"):
        return read_yaml(path)
    try:
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
    except UnicodeDecodeError as e:
        raise ValueError(f"--config {path}: not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--config {path}: not valid JSON ({e})") from None
    stored = stored.get("config", stored) if isinstance(stored, dict) else stored
    if not isinstance(stored, dict):
        raise ValueError(f"--config {path}: not a JSON object of config keys")
    return stored


def run_config(args, adaln_meta=None):
    """The run Config that built the training data: --config, else the one stored in --adaln (the
    config that prepared its training data, else its run config; `adaln_meta` when read already),
    else the defaults; --full_ckpt / --text_encoder override its codec and text encoder."""
    from adaln import read_adaln_metadata
    from config import Config, apply_overrides

    stored, where = {}, "defaults"
    if args.config:
        stored, where = read_config_file(args.config), f"--config {args.config}"
    elif args.adaln:
        files.check_file(args.adaln, "--adaln")
        meta = adaln_meta if adaln_meta is not None else read_adaln_metadata(args.adaln)
        stored, where = meta.get("data_config") or meta.get("config") or {}, f"--adaln {args.adaln}"
    cfg = apply_overrides(Config(), stored, where)
    overrides = {}
    if args.full_ckpt:  # official codec and text projection
        overrides.update(codec="ltx", codec_ckpt=args.full_ckpt, text_ckpt=args.full_ckpt)
    if args.text_encoder:
        overrides["text_encoder"] = args.text_encoder
    return apply_overrides(cfg, overrides, "sample.py flags")


def load_dit_from_args(args, device, dtype, av=False, adaln_meta=None):
    """(run config, DiT in eval mode with --lora applied) from the CLI flags; clear errors naming the files."""
    from model import load_dit

    files.check_file(args.ckpt, "--ckpt")
    if args.full_ckpt:
        files.check_file(args.full_ckpt, "--full_ckpt")
    cfg = run_config(args, adaln_meta)
    try:
        model = load_dit(args.ckpt, av=av, device=device, dtype=dtype, strict=True)
    except files.BadFile as e:  # damaged, truncated, NaN: the message names the file and says so
        raise files.BadFile(f"--ckpt {e}") from None
    except (KeyError, RuntimeError, ValueError) as e:
        want = "--av needs an audio-video (LTX-2 / LTX-2.3 AV) checkpoint" if av else \
            "not a DiT checkpoint this model can load"
        raise ValueError(f"--ckpt {args.ckpt}: {want}:\n{e}") from e
    if args.lora:
        from lora import load_lora

        files.check_file(args.lora, "--lora")
        load_lora(model, args.lora)  # raises when its keys match no module of the model
    return cfg, model.eval()


def load_pipeline(args, device, dtype):
    """(model, codec, text_encoder, connector, adaln, speaker) from parsed CLI arguments."""
    import text

    adaln_file = None
    if args.adaln and args.ref_mode in ("adaln", "both"):  # read (and checked) before minutes of model loading
        from adaln import read_adaln_file

        files.check_file(args.adaln, "--adaln")
        adaln_file = read_adaln_file(args.adaln)
    cfg, model = load_dit_from_args(args, device, dtype, adaln_meta=adaln_file[1] if adaln_file else None)
    codec, text_encoder, speaker, _ = encoders.load_models(cfg, torch.device(device))
    connector = None
    for path in (args.ckpt, args.full_ckpt):  # a train.py DiT file carries its connector; else the full file
        if path:
            try:
                connector = text.load_text_connector(path, register_layout=cfg.register_layout, device=device)
                break
            except files.BadFile:  # damaged or NaN: never fall back to another connector
                raise
            except (KeyError, ValueError):
                continue
    if connector is None and not args.full_ckpt:  # a frozen connector: built as train.py built it
        connector = text.build_text_connector(cfg.model, ckpt=cfg.ckpt, register_layout=cfg.register_layout,
                                              device=device, seed=cfg.seed)
    if connector is None:
        raise ValueError(f"no text connector (audio_embeddings_connector.*) in --ckpt {args.ckpt}"
                         + (f" or --full_ckpt {args.full_ckpt}" if args.full_ckpt else "; give --full_ckpt"))
    width = model.cfg.caption_channels or model.cfg.cross_attention_dim
    text_width = connector.learnable_registers.shape[-1]
    if codec.latent_dim != model.cfg.in_channels or text_width != width:
        raise ValueError(f"--ckpt {args.ckpt} takes {model.cfg.in_channels} latent features and {width}-wide text, "
                         f"but the codec gives {codec.latent_dim} and the connector {text_width}: "
                         "give the run's --config (or --full_ckpt for official weights)")
    adaln = None
    if adaln_file is not None:
        adaln = adaln_for(args.adaln, *adaln_file, model, speaker).to(device).eval()
    return model, codec, text_encoder, connector.eval(), adaln, speaker


def load_pipeline_av(args, device, dtype):
    """(model, codec, text_encoder with both projections, (video, audio) connectors) for --av."""
    import text
    from codec import codec_from_config

    cfg, model = load_dit_from_args(args, device, dtype, av=True)
    codec = codec_from_config(cfg).to(device).eval()
    text_ckpt = cfg.text_ckpt or (args.full_ckpt or "")
    text_encoder = text.build_text_encoder(
        cfg.text_encoder, max_text_len=cfg.max_text_len, device=device, seed=cfg.seed, ckpt=text_ckpt,
        dtype=torch.bfloat16 if str(device).startswith("cuda") else torch.float32,
        dim=None if text_ckpt else model.cfg.cross_attention_dim,
        video_dim=None if text_ckpt else model.cfg.video_cross_attention_dim)
    connectors = []
    for stream in ("video", "audio"):
        for path in (args.ckpt, args.full_ckpt):
            if path:
                try:
                    connectors.append(text.load_text_connector(path, register_layout=cfg.register_layout,
                                                               device=device, stream=stream).eval())
                    break
                except files.BadFile:  # damaged or NaN: never fall back to another connector
                    raise
                except (KeyError, ValueError):
                    continue
        else:
            raise ValueError(f"no {stream}_embeddings_connector.* in --ckpt {args.ckpt}"
                             + (f" or --full_ckpt {args.full_ckpt}" if args.full_ckpt else "; give --full_ckpt"))
    if codec.latent_dim != model.cfg.in_channels:
        raise ValueError(f"--ckpt {args.ckpt} takes {model.cfg.in_channels} audio latent features, the codec gives "
                         f"{codec.latent_dim}: give the run's --config (or --full_ckpt for official weights)")
    return model, codec, text_encoder, tuple(connectors)


def adaln_for(path, state, meta, model, speaker=None):
    """The SpeakerAdaLNZero of train.py's `adaln.safetensors` at `path` (or an old `adaln.pt` that
    loads without unpickling), from its `state` and `meta` (adaln.read_adaln_file); raises naming
    the file when it does not fit `model` or was trained on the features of other speaker
    extractors than `speaker`."""
    from adaln import adaln_from_state

    module = adaln_from_state(state, meta, path, rows=model.cfg.ada_rows)
    if module.num_blocks != model.cfg.num_layers or module.rows * module.dim != model.cfg.ada_rows * model.cfg.dim:
        raise ValueError(f"--adaln {path}: {module.num_blocks} heads of width {module.rows * module.dim}, but the "
                         f"DiT has {model.cfg.num_layers} blocks of {model.cfg.ada_rows}x{model.cfg.dim}: made for "
                         "another DiT")
    if speaker is None or speaker.dim != module.in_dim:
        raise ValueError(f"--adaln {path} takes {module.in_dim}-d speaker features, the run config's extractors "
                         f"give {None if speaker is None else speaker.dim}")
    want = meta.get("speaker_fingerprint")
    if want and speaker.fingerprint() != want:
        raise ValueError(f"--adaln {path} was trained on features of other speaker extractors "
                         f"({meta.get('speaker_extractors')}, fingerprint {want}) than these ({speaker.fingerprint()})")
    return module


def sample_kwargs(args, device):
    """sample()'s keyword arguments from the guidance flags."""
    blocks = tuple(int(b) for b in args.stg_blocks.split(",") if b.strip()) or None
    return dict(steps=args.steps, cfg=args.cfg, stg=args.stg, stg_blocks=blocks, spk_cfg=args.spk_cfg,
                rescale=args.rescale, duration="auto" if args.duration == "auto" else float(args.duration),
                device=device, dtype=compute_dtype(device, args.dtype), batch_size=args.batch_size,
                ref_mode=args.ref_mode,
                negative_prompt=args.negative_prompt, shift_tokens=args.shift_tokens or None,
                sigma_last=args.sigma_last, temperature=args.temperature, eta=args.eta,
                spk_sigma=parse_spk_sigma(args.spk_sigma))


def parse_spk_sigma(text):
    """--spk_sigma "LOW,HIGH" -> (low, high); `sampler.sample` checks the range."""
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--spk_sigma {text!r}: expected LOW,HIGH (two numbers, e.g. 0.45,1)") from None
    return low, high


def main(argv=None):
    args = parse_args(argv)
    prompts = [args.prompt] if args.prompt else []
    if args.prompts:
        files.check_file(args.prompts, "--prompts")
        with open(args.prompts) as f:
            prompts += [line.strip() for line in f if line.strip()]
    if not prompts:
        raise SystemExit("give --prompt or --prompts")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if args.out and len(prompts) * len(seeds) != 1:
        raise SystemExit("--out takes one prompt and one seed; use --out_dir for more")
    if args.ref:  # fail before minutes of model loading
        if args.ref_mode in ("adaln", "both") and not args.adaln:
            raise SystemExit(f"--ref_mode {args.ref_mode} needs --adaln (or use --ref_mode tokens)")
        check_reference(args.ref)
    device = resolve_device(args.device)
    dtype = compute_dtype(device, args.dtype)
    if args.av:
        return main_av(args, prompts, seeds, device, dtype)
    t0 = time.time()
    model, codec, text_encoder, connector, adaln, speaker = load_pipeline(args, device, dtype)
    kwargs = sample_kwargs(args, device)
    kwargs.update(dtype=dtype, ref_mode=args.ref_mode if args.ref else "none")
    items = [(p, s) for p in prompts for s in seeds]
    t1 = time.time()
    wavs = sample(model, codec, text_encoder, connector, [p for p, _ in items], seeds=[s for _, s in items],
                  ref_wavs=[args.ref or None] * len(items), adaln=adaln, speaker=speaker, **kwargs)
    seconds = time.time() - t1
    settings = dict(vars(args))
    settings.update(kwargs, dtype=str(dtype), stg_blocks=list(kwargs["stg_blocks"] or [model.cfg.stg_block]),
                    output_rate=codec.output_rate, load_seconds=round(t1 - t0, 2), sample_seconds=round(seconds, 2))
    out_dir = os.path.dirname(args.out) if args.out else args.out_dir
    os.makedirs(out_dir or ".", exist_ok=True)
    audio_seconds = 0.0
    for k, ((prompt, seed), wav) in enumerate(zip(items, wavs)):
        path = args.out or os.path.join(args.out_dir, f"{k // len(seeds):03d}_seed{seed}.wav")
        meta = dict(settings, prompt=prompt, seed=seed, ref=os.path.abspath(args.ref) if args.ref else None,
                    spoken_text=spoken_text(prompt), duration_s=wav.shape[-1] / codec.output_rate)
        audio.write_wav(path, wav, codec.output_rate, meta)
        audio_seconds += meta["duration_s"]
        print(f"wrote {path} ({meta['duration_s']:.2f} s)")
    print(f"sampled {audio_seconds:.1f} s of audio in {seconds:.1f} s (real-time factor {seconds / audio_seconds:.2f})")


def main_av(args, prompts, seeds, device, dtype):
    """sample.py --av: per item a WAV, `<name>.video_latents.pt` (ltx-trainer's latents/ layout) and a
    JSON sidecar."""
    if args.ref or args.adaln:
        raise SystemExit("--av samples without a speaker reference (--ref / --adaln are for the audio-only model)")
    if args.temperature != 1.0:
        raise SystemExit("--av samples at temperature 1 (--temperature is for the audio-only model)")
    if args.eta != 0.0:
        raise SystemExit("--av samples with the deterministic Euler sampler (--eta is for the audio-only model)")
    if args.sigma_last != REFERENCE_SIGMA_LAST:
        raise SystemExit("--av samples with the reference schedule (--sigma_last is for the audio-only model)")
    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--size {args.size!r}: give WIDTHxHEIGHT in pixels, e.g. 192x192") from None
    F, H, W = video_latent_shape(args.frames, height, width)  # fail before loading anything
    t0 = time.time()
    model, codec, text_encoder, connectors = load_pipeline_av(args, device, dtype)
    items = [(p, s) for p in prompts for s in seeds]
    t1 = time.time()
    results = sample_av(model, codec, text_encoder, connectors, [p for p, _ in items], seeds=[s for _, s in items],
                        frames=args.frames, height=height, width=width, fps=args.fps, steps=args.steps,
                        cfg=(args.video_cfg, args.cfg),
                        rescale=args.rescale, device=device, dtype=dtype, negative_prompt=args.negative_prompt,
                        shift_tokens=args.shift_tokens or None)
    settings = dict(vars(args), dtype=str(dtype), output_rate=codec.output_rate, load_seconds=round(t1 - t0, 2),
                    sample_seconds=round(time.time() - t1, 2), video_latent_shape=[F, H, W])
    out_dir = os.path.dirname(args.out) if args.out else args.out_dir
    os.makedirs(out_dir or ".", exist_ok=True)
    for k, ((prompt, seed), (wav, latents)) in enumerate(zip(items, results)):
        path = args.out or os.path.join(args.out_dir, f"{k // len(seeds):03d}_seed{seed}.wav")
        stem = os.path.splitext(path)[0]
        files.torch_save({"latents": latents.contiguous(), "num_frames": F, "height": H, "width": W, "fps": args.fps},
                         stem + ".video_latents.pt")
        audio.write_wav(path, wav, codec.output_rate, dict(
            settings, prompt=prompt, seed=seed, duration_s=wav.shape[-1] / codec.output_rate,
            video_latents=stem + ".video_latents.pt"))
        print(f"wrote {path} and {stem}.video_latents.pt")
    print(video_decode_hint())


if __name__ == "__main__":
    from config import run_cli

    run_cli(main)
