"""One typed, flat run config.

Precedence (last wins): the dataclass defaults < `configs/*.yaml` files (in the order given) <
`--key=value` on the command line. Unknown keys and values of the wrong type are errors that name
the key and where it came from, so a misspelt option can never be silently ignored.

    cfg = load_config(["configs/run7.yaml", "--lr=1e-5"])
"""

import dataclasses
import json
import math
import sys
import typing
from dataclasses import dataclass, field

import yaml


@dataclass
class Config:
    # --- run -------------------------------------------------------------------------------
    name: str = "tiny"  # runs/<name>/ holds checkpoints, metrics.jsonl and the resolved config
    out_dir: str = "runs"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "bf16"  # compute dtype of the DiT: bf16 | fp32 (CPU bf16 autocast is ~1.7x faster)

    # --- model (model.py) ------------------------------------------------------------------
    model: str = "tiny"  # a preset name in model.PRESETS; ignored when `ckpt` is given
    ckpt: str = ""  # official / merged DiT safetensors; the model is built from its metadata
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile each DiT block (minutes to build on a CPU; train.build)

    # --- codec (codec.py) ------------------------------------------------------------------
    codec: str = "mel"  # mel | ltx
    codec_ckpt: str = ""  # full LTX checkpoint holding audio_vae.* and vocoder.* (codec=ltx)
    # --- mel codec (codec.MelCodec; codec=mel): 4 frames x mel_n_mels features per 25 Hz token
    mel_n_mels: int = 32  # 32 -> 128 features per token, the LTX latent width
    mel_n_fft: int = 512
    mel_mean: float = -6.0  # fixed log-mel normalisation (not fitted): (log mel - mean) / std
    mel_std: float = 2.5
    mel_basis_dim: int = 0  # > 0: each token's 4 x mel_n_mels features projected onto this many principal
    # components of the train split's tokens (codec.fit_mel_basis; the pipeline's prepare step fits them,
    # `python data.py fit_codec` by hand); 0: the features as they are
    mel_basis_whiten: float = 0.0  # the basis's per-component scale: each component's spread becomes
    # std ** (1 - whiten); 0: one scale for all (codec.fit_mel_basis)
    mel_basis: str = ""  # the fitted basis file (safetensors) every step encodes and decodes with
    griffin_lim_iters: int = 32  # decode quality vs CPU time

    # --- text (text.py) --------------------------------------------------------------------
    text_encoder: str = "byte"  # byte (tiny, random, no download) | a local Gemma 3 directory
    max_text_len: int = 1024  # prompts are truncated / left-padded to this many tokens (LTX: 1024)
    text_ckpt: str = ""  # file with text_embedding_projection.* + audio_embeddings_connector.*; "" = ckpt
    register_layout: str = "official"  # official (tokens in place) | ltx_core_1_0 (compacted)

    # --- data (data.py) --------------------------------------------------------------------
    manifest: str = ""  # JSONL of training items
    val_manifest: str = ""
    cache_dir: str = "cache"
    skip_bad: bool = False  # skip (and count) bad inputs instead of stopping with an error
    sources: dict = field(default_factory=dict)  # source name -> sampling weight
    # --- data: DramaBox format and sampling (data.py) ---------------------------------------
    min_seconds: float = 1.0  # prepare rejects (or skips) clips shorter than this
    max_seconds: float = 20.0  # ... and longer than this
    ref_max_seconds: float = 10.0  # longer references are cropped to a random window (DramaBox ~10 s)
    clone_probs: list[float] = field(default_factory=lambda: [0.33, 0.33, 0.34])  # forward/reverse/uncond
    text_dropout: float = 0.1  # prob. of the empty prompt's features instead of the item's
    max_silence_frames: int = 25  # 0..N latent frames of silence prepended to the target
    ref_offset_s: float = 0.5  # gap between the target's end and the reference's first position

    # --- training (train.py) ---------------------------------------------------------------
    stage: str = "base"  # base (full DiT) | lora (stage 1) | adaln (stage 2)
    global_batch: int = 8
    micro_batch: int = 8
    max_steps: int = 100
    lr: float = 1e-4
    min_lr_ratio: float = 0.0
    warmup_frac: float = 0.05
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    log_every: int = 1
    val_every: int = 50
    ckpt_every: int = 50
    resume: bool = False  # continue from runs/<name>/checkpoint.pt (bit-identical to no interruption)
    overwrite: bool = False  # replace the run already in runs/<name>/ (without it, train.py refuses)
    beta1: float = 0.9
    beta2: float = 0.999
    param_dtype: str = "fp32"  # storage dtype of the DiT: bf16 at scale, fp32 for CPU autocast runs
    master_weights: bool = True  # fp32 masters for low-precision trainable params (the bf16 freeze fix)
    offload_masters: bool = True  # masters + Adam state on the CPU (pinned on CUDA)
    sigma_sampler: str = "shifted_logit_normal"  # shifted_logit_normal | uniform | fixed
    sigma_fixed: float = 0.5  # the σ of sigma_sampler=fixed
    sigma_mu_offset: float = 0.0  # added to the shifted logit-normal's μ (losses.sample_sigma): > 0, more high σ
    # --- a DiT trained from scratch (stage base): help it find the words ------------------------
    text_progress_theta: float = 0.0  # > 0: the new DiT's progress rope on its text cross-attention (model.DiTConfig;
                                      # byte text encoder only). A checkpoint carries its own value.
    hold_text_gates: bool = False  # stage base: the cross-attention head gates (audio_attn2.to_gate_logits) stay
                                   # at their zero init (gate 1) instead of training; trained, a small model shuts
                                   # them before the words are any use to it
    # --- stage 1: LoRA (lora.py) -------------------------------------------------------------
    lora_targets: list[str] = field(default_factory=lambda: ["laionbox"])  # presets or name patterns
    lora_rank: int = 64
    lora_alpha: float = 64.0
    lora_dropout: float = 0.0
    lora_speaker: bool = False  # stage 1 also trains a SpeakerAdaLNZero with the LoRA (stage 2 starts from it)
    # --- stage 2: SpeakerAdaLNZero + ReFL (adaln.py, speaker.py, losses.py) ------------------
    adaln_hidden: int = 512
    adaln_init: str = ""  # stage 2 starts from this SpeakerAdaLNZero file (a speaker-aware stage 1's); "" = zero heads
    speaker_dropout: float = 0.1  # prob. of training a sample without its speaker features
    adaln_lr_scale: float = 1.0  # the SpeakerAdaLNZero's learning rate over `lr` where it trains beside a LoRA
    speaker_extractors: list[str] = field(default_factory=lambda: ["mel_stats"])
    speaker_paths: dict = field(default_factory=dict)  # extractor -> local weights directory
    # --- tiny_sv: the speaker encoder train_sv.py trains on the train split (speaker.TinySVNet)
    sv_steps: int = 200
    sv_batch: int = 32  # crops per step
    sv_lr: float = 3.0e-3
    sv_crop_seconds: float = 1.2  # random crop of each clip (shorter clips are tiled)
    sv_dim: int = 128
    sv_margin: float = 0.2  # additive angular-margin softmax (CosFace): logits s·(cos − m·[own voice])
    sv_scale: float = 30.0
    aux_losses: list[str] = field(default_factory=list)  # speaker | dnsmos
    aux_ratios: dict = field(default_factory=lambda: {"speaker": 1 / 12, "dnsmos": 1 / 12})  # 6:1 flow:aux
    aux_cap: float = 20.0
    aux_decay: float = 0.95
    aux_sigma_max: float = 0.4
    aux_max_seconds: float = 10.0
    aux_clips: int = 1  # clips decoded per micro-batch for the auxiliary losses
    aux_crop_seconds: float = 4.0  # decode and score only the middle this-many seconds of a clip (0 = all)
    val_spk_sigma: float = 0.3  # σ of the one-step x0̂ whose speaker similarity validation reports
    best_by: str = "val_loss"  # val_loss | val_spk_sim (stage 2 with auxiliary models): picks *_best
    # --- audio-video mode (train.py `av`; data.PrecomputedDataset, model.forward_av) --------
    av: bool = False  # LoRA on the joint audio-video model from an ltx-trainer precomputed dataset
    precomputed: str = ""  # the dataset directory (latents/, conditions/, audio_latents/)
    av_sigma: str = "independent"  # independent (each stream shifted by its own token count) | shared
    audio_weight: float = 1.0  # fixed w_a of L = L_video + w_a·L_audio (official: 1)
    audio_balancer: bool = False  # opt-in EMA balancer (PR #720, two-sided clamp) instead of audio_weight
    balancer_target: float = 0.33
    balancer_decay: float = 0.99
    balancer_min: float = 0.05
    balancer_max: float = 20.0
    audio_free: str = "mask"  # samples without audio: mask (no audio loss, no grad into audio adapters) | preserve
    preserve_weight: float = 1.0  # weight of the preservation MSE vs the LoRA-disabled audio prediction

    # --- pipeline (pipeline.py): a config with `pipeline:` runs these steps in order --------
    pipeline: list[str] = field(default_factory=list)  # corpus prepare base lora merge adaln sample eval
    stage_configs: dict = field(default_factory=dict)  # stage (base | lora | adaln) -> YAML of its overrides
    corpus_dir: str = "data/tiny"  # corpus.py output; its train / val manifests feed prepare
    corpus_speakers: int = 8
    corpus_utts: int = 40  # utterances per speaker, split train / val / judge by corpus.py
    corpus_seed: int = 0  # the corpus stays the same across training seeds
    corpus_unseen: int = 0  # the last N of corpus_speakers are held out of every training stage (zero-shot)
    corpus_val_frac: float = 0.15  # val clips: the sampling prompts and references (prompts x speakers samples)
    corpus_judge_frac: float = 0.25  # judge clips: the judges' centroids and training set, never generated from
    corpus_extra_voices: int = 0  # training-only voices drawn from eSpeak's variants (corpus.draw_extra_voices)
    corpus_extra_utts: int = 20  # clips per extra voice, all in train (none in base: the base hears the judged voices)
    sample_steps: int = 16  # Euler steps per sample in the pipeline's sample step
    sample_cfg: float = 1.0  # CFG scale of the pipeline's samples (1 = off: one pass per step)
    sample_spk_cfg: float = 3.0  # speaker guidance scale of the "guided" stage-2 variant
    sample_spk_sigma: list[float] = field(default_factory=lambda: [0.0, 1.0])  # σ range of its guided steps
    sample_temperature: float = 1.0  # starting noise x this (sample.py --temperature; 1 = the reference pipelines')
    sample_eta: float = 0.0  # share of fresh noise per sampling step (sample.py --eta; 0 = the reference Euler)
    sample_shift_tokens: int = 0  # token count of the σ-schedule shift (sample.py --shift_tokens; 0 = 4096, the
    # reference pipelines')
    sample_sigma_last: float = 0.1  # last non-zero σ of the schedule (sample.py --sigma_last; 0.1 = the reference's)
    sample_seeds: list[int] = field(default_factory=lambda: [0])  # one sample per prompt x speaker x seed
    sample_prompts: int = 0  # the first N val prompts are spoken by every reference (0 = all of them)
    sample_split: str = "held_out"  # held_out: those prompts and each voice's first val clip (the numbers a run
    # reports); development: the next N prompts and each voice's second clip, for choosing sampling settings
    # without looking at the held-out numbers (written under RUN/development/)
    sample_batch: int = 32
    eval_metrics: str = "judge,dnsmos"  # eval.py --metrics groups of the report
    eval_dnsmos_clips: int = 16  # DNSMOS scores this many samples per variant, spread evenly (0 = all)
    asr_steps: int = 400  # training steps of the pipeline's evaluation-only recogniser (asr.py, the `asr` step)
    cpu_threads: int = 0  # torch threads of every step (OMP_NUM_THREADS); 0 = torch's default
    train_processes: int = 1  # per training stage; > 1 launches it with torchrun (run.sh --gpus N sets it)
    debug: bool = False  # expected errors print the traceback too (see run_cli), not just one line


# the errors our own checks raise for bad input; anything else is a bug and keeps its traceback
EXPECTED_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, IsADirectoryError, PermissionError)


def wants_debug(argv):
    """True when the command line asks for tracebacks: `--debug`, `--debug=true` (or 1, yes)."""
    return any(a == "--debug" or (a.startswith("--debug=") and a[8:].lower() in ("true", "1", "yes")) for a in argv)


def run_cli(main, argv=None):
    """Run an entry point's `main(argv)`. An expected error (bad input or config, found by our checks)
    prints one line naming the problem on stderr and exits 1; with `--debug` it raises as usual.

        if __name__ == "__main__":
            run_cli(main)
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return main(argv)
    except EXPECTED_ERRORS as e:
        if wants_debug(argv):
            raise
        # KeyError's str() quotes its message; every message is kept to one line
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        message = " ".join(str(message).split()) or type(e).__name__
        print(f"error: {message} (--debug=true for the traceback)", file=sys.stderr)
        sys.exit(1)


def _type_error(key, value, want, where):
    return TypeError(f"config key '{key}' from {where}: expected {want}, got {value!r}")


def _coerce(key, value, typ, where):
    """Convert `value` (from YAML or the CLI) to the field type `typ`, or raise naming `key`."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise _type_error(key, value, "a bool", where)
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise _type_error(key, value, "an int", where)
        try:
            return int(value)
        except ValueError:
            raise _type_error(key, value, "an int", where) from None
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise _type_error(key, value, "a float", where)
        try:
            return float(value)
        except ValueError:
            raise _type_error(key, value, "a float", where) from None
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise _type_error(key, value, "a string", where)
        return str(value)
    origin = typing.get_origin(typ) or typ
    if origin in (list, tuple, dict):
        if isinstance(value, str):  # from the CLI: YAML syntax, or a bare comma list
            text = value.strip()
            if text[:1] in ("[", "{"):
                value = yaml.safe_load(text)
            else:  # "" is the empty list (or mapping)
                value = {} if origin is dict and not text else [v.strip() for v in text.split(",") if v.strip()]
        if origin is dict:
            if not isinstance(value, dict):
                raise _type_error(key, value, "a mapping", where)
            return dict(value)
        if not isinstance(value, (list, tuple)):
            raise _type_error(key, value, "a list", where)
        args = typing.get_args(typ)  # list[int] -> (int,); tuple[int, ...] -> (int, Ellipsis)
        if args:
            value = [_coerce(key, v, args[0], where) for v in value]
        return origin(value)
    raise TypeError(f"config key '{key}': unsupported field type {typ}")


def _fields():
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def apply_overrides(cfg, overrides, where):
    """Return a copy of `cfg` with `overrides` (a dict) applied; unknown keys raise KeyError."""
    types = _fields()
    changes = {}
    for key, value in overrides.items():
        if key not in types:
            close = [k for k in types if k.split("_")[0] == key.split("_")[0]]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise KeyError(f"unknown config key '{key}' in {where}{hint}")
        changes[key] = _coerce(key, value, types[key], where)
    return dataclasses.replace(cfg, **changes)


def load_config(argv=None, base=None):
    """Build a Config from YAML paths and `--key=value` arguments (`argv`, default sys.argv[1:]);
    its values are checked (`check_values`) once every override is applied."""
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = base if base is not None else Config()
    where = {}  # key -> the file or "the command line" that set it last, for error messages
    for arg in argv:
        if arg.startswith("--"):
            if "=" not in arg and _fields().get(arg[2:].replace("-", "_")) is bool:
                arg += "=true"  # a bare boolean flag: --resume is --resume=true
            if "=" not in arg:
                raise ValueError(f"command-line override '{arg}' must look like --key=value")
            key, value = arg[2:].split("=", 1)
            key = key.replace("-", "_")
            cfg = apply_overrides(cfg, {key: value}, "the command line")
            where[key] = "the command line"
        else:
            data = read_yaml(arg)
            cfg = apply_overrides(cfg, data, arg)
            where.update(dict.fromkeys(data, arg))
    check_values(cfg, where)
    return cfg


def read_yaml(path):
    """The key: value mapping of a YAML config file; a clear error for anything else."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file, so not a YAML config") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValueError(f"{path}: not valid YAML{at} ({getattr(e, 'problem', None) or e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must be a YAML mapping of key: value, not a {type(data).__name__}")
    return data


# allowed values of the keys that name a choice
CHOICES = {
    "device": ("auto", "cpu", "cuda"), "dtype": ("bf16", "fp16", "fp32"), "param_dtype": ("bf16", "fp16", "fp32"),
    "stage": ("base", "lora", "adaln"), "codec": ("mel", "ltx"), "register_layout": ("official", "ltx_core_1_0"),
    "sigma_sampler": ("shifted_logit_normal", "uniform", "fixed"), "best_by": ("val_loss", "val_spk_sim"),
    "av_sigma": ("independent", "shared"), "audio_free": ("mask", "preserve"),
    "sample_split": ("held_out", "development"),
}
# (low, high) bounds of numeric keys, inclusive unless listed below; None = unbounded on that side
BOUNDS = {
    "global_batch": (1, None), "micro_batch": (1, None), "max_steps": (0, None), "log_every": (1, None),
    "val_every": (1, None), "ckpt_every": (1, None), "max_text_len": (1, None), "mel_n_mels": (1, None),
    "mel_basis_dim": (0, None), "mel_basis_whiten": (0, 1),
    "mel_n_fft": (2, None), "griffin_lim_iters": (0, None), "lora_rank": (1, None), "adaln_hidden": (1, None),
    "aux_clips": (0, None), "sv_steps": (0, None), "sv_batch": (2, None), "sv_dim": (1, None),
    "sv_lr": (0, None), "sv_crop_seconds": (0.1, None), "sv_margin": (0, 1), "sv_scale": (0, None),
    "sample_steps": (1, None), "sample_batch": (1, None), "sample_temperature": (0, None), "sample_eta": (0, 1),
    "asr_steps": (1, None),
    "sample_shift_tokens": (0, None), "sample_sigma_last": (0, 1),
    "corpus_speakers": (1, None), "corpus_utts": (1, None), "max_silence_frames": (0, None), "cpu_threads": (0, None),
    "lr": (0, None), "weight_decay": (0, None), "grad_clip": (0, None), "mel_std": (0, None),
    "warmup_frac": (0, 1), "min_lr_ratio": (0, 1), "text_dropout": (0, 1), "speaker_dropout": (0, 1),
    "adaln_lr_scale": (0, None),
    "lora_dropout": (0, 1), "beta1": (0, 1), "beta2": (0, 1), "sigma_fixed": (0, 1), "sigma_mu_offset": (-5, 5),
    "corpus_val_frac": (0, 1), "corpus_judge_frac": (0, 1), "corpus_extra_voices": (0, None),
    "corpus_extra_utts": (1, None),
    "min_seconds": (0, None), "max_seconds": (0, None), "ref_max_seconds": (0, None), "aux_sigma_max": (0, None),
    "aux_max_seconds": (0, None), "aux_crop_seconds": (0, None), "val_spk_sigma": (0, 1),
}
STRICT_LOW = ("grad_clip", "mel_std", "sample_temperature", "sample_sigma_last")  # > low: clipping to 0, dividing
# by 0, sampling from no noise at all, a schedule that reaches σ 0 a step early are never meant
STRICT_HIGH = ("beta1", "beta2", "sample_sigma_last")  # < high: Adam's bias correction 1 - beta^t is 0 at beta = 1;
# a schedule whose last σ is 1 never denoises


def check_values(cfg, where=None):
    """Every config value within its domain, checked in one place before anything runs: a choice key
    holds a known choice, a number is finite and in bounds, a list has its length. Raises ValueError
    naming the key and where it was set (`where`: key -> source)."""
    where = where or {}

    def fail(key, problem):
        src = f" (from {where[key]})" if key in where else ""
        raise ValueError(f"config key '{key}'{src}: {problem}")

    for key, choices in CHOICES.items():
        if getattr(cfg, key) not in choices:
            fail(key, f"{getattr(cfg, key)!r} is not one of {' | '.join(choices)}")
    for key, typ in _fields().items():
        if typ is float and not math.isfinite(getattr(cfg, key)):
            fail(key, f"must be a finite number, got {getattr(cfg, key)}")
    for key, (low, high) in BOUNDS.items():
        value = getattr(cfg, key)
        if low is not None and (value < low or (key in STRICT_LOW and value == low)):
            fail(key, f"must be {'>' if key in STRICT_LOW else '>='} {low}, got {value}")
        if high is not None and (value > high or (key in STRICT_HIGH and value == high)):
            fail(key, f"must be {'<' if key in STRICT_HIGH else '<='} {high}, got {value}")
    if cfg.global_batch % cfg.micro_batch:
        fail("micro_batch", f"global_batch {cfg.global_batch} is not a multiple of micro_batch {cfg.micro_batch}")
    if cfg.min_seconds > cfg.max_seconds:
        fail("min_seconds", f"{cfg.min_seconds} is above max_seconds {cfg.max_seconds}")
    if len(cfg.sample_spk_sigma) != 2 or not 0 <= cfg.sample_spk_sigma[0] <= cfg.sample_spk_sigma[1] <= 1:
        fail("sample_spk_sigma", f"needs [low, high] with 0 <= low <= high <= 1, got {cfg.sample_spk_sigma}")
    if len(cfg.clone_probs) != 3 or min(cfg.clone_probs) < 0 or sum(cfg.clone_probs) <= 0:
        fail("clone_probs", f"needs 3 probabilities >= 0 (forward, reverse, uncond) with a positive sum, "
                            f"got {cfg.clone_probs}")
    unknown = [k for k in cfg.aux_losses if k not in ("speaker", "dnsmos")]
    if unknown:
        fail("aux_losses", f"unknown losses {unknown} (speaker | dnsmos)")
    if cfg.mel_basis_dim > 4 * cfg.mel_n_mels:
        fail("mel_basis_dim", f"{cfg.mel_basis_dim} is more than a token's 4 x {cfg.mel_n_mels} mel features")
    if not cfg.name or cfg.name != cfg.name.strip():
        fail("name", f"{cfg.name!r} cannot name a run directory")


def config_dict(cfg):
    """The config as a plain dict (stored in every checkpoint and printed at start)."""
    return dataclasses.asdict(cfg)


def format_config(cfg):
    """Resolved config as one `key: value` per line, for the log."""
    return "\n".join(f"{k}: {json.dumps(v)}" for k, v in config_dict(cfg).items())
