"""The whole recipe, end to end, from one config: corpus -> sv -> prepare -> base -> lora -> merge
-> adaln -> sample -> asr -> eval.

    ./run.sh configs/tiny.yaml                    # = python pipeline.py configs/tiny.yaml
    python pipeline.py configs/micro.yaml --name=smoke --out_dir=/tmp/runs

A config with a `pipeline:` list of steps runs them in order. The training steps are the same
commands a person would type, each a subprocess of this Python: `train.py CONFIG STAGE_YAML
[--key=value ...] --stage=... --name=<name>_<stage> --ckpt=<previous stage's output>`, where
`stage_configs` maps a stage to the YAML with that stage's overrides. Each stage hands its output
to the next:

    sv     runs/<name>_sv/sv.safetensors           (train_sv.py: the tiny_sv speaker encoder, when the
                                                    config's speaker_extractors name it)
    prepare runs/<name>_codec/basis.safetensors    (data.py fit_codec: the mel codec's basis, when
                                                    mel_basis_dim > 0 and no mel_basis is given)
    base   runs/<name>_base/dit.safetensors        (the DiT + text connector, from scratch, on the corpus's
                                                    base.jsonl: each clip also under its voice's description)
    lora   runs/<name>_lora/lora.safetensors       (stage 1 on the frozen base)
    merge  runs/<name>/merged.safetensors          (merge.py: the LoRA folded into the base)
    adaln  runs/<name>_adaln/adaln.safetensors     (stage 2: SpeakerAdaLNZero on the frozen merge)

`sample` speaks every validation prompt with one held-out reference clip of each speaker (the
corpus's `val` split: seen by neither the generator's training nor the judge) in three variants:

    baseline      the merged backbone, no speaker path: it cannot know the voice (chance)
    adaln         stage 2, speaker from the reference through SpeakerAdaLNZero
    adaln_guided  the same with speaker guidance (spk_cfg = sample_spk_cfg)

`asr` trains the evaluation-only recogniser (asr.py) on the train split's real clips, runs/<name>/asr.safetensors;
with `cer` in eval_metrics, eval.py scores each sample's words with it.

`eval` trains the speaker judge (judge.py) on the corpus's `judge` split, writes its accuracy
(chance = 1/speakers) and similarity margin per variant to runs/<name>/judge.json, and runs
eval.py for the HTML report runs/<name>/report.html. Everything else the run wrote is listed in
runs/<name>/summary.json, with the wall time of every step.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from config import config_dict, load_config

STEPS = ("corpus", "sv", "prepare", "base", "lora", "merge", "adaln", "sample", "asr", "eval")
STAGE_OUTPUT = {"base": "dit.safetensors", "lora": "lora.safetensors", "adaln": "adaln.safetensors"}
VARIANTS = ("baseline", "adaln", "adaln_guided")
HERE = Path(__file__).resolve().parent
REPORT_PLAYER_RATE = 8000  # the report embeds every sample and its reference: 8 kHz halves its size


def split_argv(argv):
    """(YAML paths, --key=value overrides) of the command line, each in the order given."""
    return [a for a in argv if not a.startswith("--")], [a for a in argv if a.startswith("--")]


def paths(cfg):
    """Every file a pipeline run reads from or writes to, by name."""
    run = Path(cfg.out_dir) / cfg.name
    corpus = Path(cfg.corpus_dir)
    out = {"run": run, "corpus": corpus, "train": corpus / "train.jsonl", "val": corpus / "val.jsonl",
           "base_train": corpus / "base.jsonl", "base_cache": Path(cfg.cache_dir) / "base",
           "judge_split": corpus / "judge.jsonl", "val_unseen": corpus / "val_unseen.jsonl",
           "judge_unseen": corpus / "judge_unseen.jsonl", "merged": run / "merged.safetensors"}
    # what the sample and eval steps write; a development split's apart, so it never overwrites the held-out numbers
    scored = run / "development" if cfg.sample_split == "development" else run
    out.update({"samples": scored / "samples", "judge": scored / "judge.safetensors",
                "judge_json": scored / "judge.json", "report": scored / "report.html", "scores": scored / "scores.json",
                "summary": scored / "summary.json", "data_config": scored / "data_config.json"})
    for stage, file in STAGE_OUTPUT.items():
        out[f"{stage}_dir"] = Path(cfg.out_dir) / f"{cfg.name}_{stage}"
        out[stage] = out[f"{stage}_dir"] / file
    out["sv"] = (Path(cfg.out_dir) / f"{cfg.name}_sv" / "sv.safetensors").resolve()
    out["asr"] = run / "asr.safetensors"  # the evaluation-only recogniser (asr.py), for both splits
    out["codec_basis"] = (Path(cfg.out_dir) / f"{cfg.name}_codec" / "basis.safetensors").resolve()
    return out


def check_config(cfg, yamls):
    """Clear errors for a pipeline config that cannot run, before minutes of work."""
    where = " + ".join(yamls) or "the command line"
    if not cfg.pipeline:
        raise ValueError(f"{where}: `pipeline` is empty: list the steps to run, from {', '.join(STEPS)}")
    unknown = [s for s in cfg.pipeline if s not in STEPS]
    if unknown:
        raise ValueError(f"{where}: unknown pipeline steps {unknown}; known: {', '.join(STEPS)}")
    order = [STEPS.index(s) for s in cfg.pipeline]
    if order != sorted(order) or len(set(order)) != len(order):
        raise ValueError(f"{where}: pipeline steps {cfg.pipeline} must each appear once, in the order {', '.join(STEPS)}")
    for stage, path in cfg.stage_configs.items():
        if stage not in STAGE_OUTPUT:
            raise ValueError(f"{where}: stage_configs key '{stage}' is not a training stage ({', '.join(STAGE_OUTPUT)})")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where}: stage_configs.{stage} = {path}: file not found")


CONFIG_LINE = re.compile(r'^[a-z][a-z_0-9]*: (".*"|-?[0-9.e+-]+|true|false|null|\[.*\]|\{.*\})$')


THREAD_ENV = {}  # OMP_NUM_THREADS for the step processes, set by main() from `cpu_threads`


def run_command(args, log_path, launcher=()):
    """Run `args` (a list) with this Python (after `launcher`, e.g. torchrun's module and flags); its
    output is shown (progress bars on stderr as they are, the resolved-config dump left out) and
    kept whole in `log_path`. Raises on failure."""
    cmd = [sys.executable, *launcher, str(HERE / args[0]), *map(str, args[1:])]
    print("  $ python " + " ".join(map(str, [*launcher, *args])), flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", buffering=1) as log:  # line-buffered: the log is readable while it runs
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **THREAD_ENV})

        def pump_stderr():  # chunks, not lines: tqdm redraws its bar with \r
            while chunk := proc.stderr.read(1):
                sys.stderr.write(chunk)
                log.write(chunk)

        errors = threading.Thread(target=pump_stderr, daemon=True)
        errors.start()
        for line in proc.stdout:
            log.write(line)
            if not CONFIG_LINE.match(line.rstrip("\n")):
                sys.stdout.write("    " + line)
                sys.stdout.flush()
        errors.join()
        proc.wait()
    if proc.returncode != 0:
        tail = "".join(open(log_path).readlines()[-25:])
        raise RuntimeError(f"step failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                           f"last lines of {log_path}:\n{tail}")


# -----------------------------------------------------------------------------------------------
# the steps


def step_corpus(cfg, p, yamls, overrides):
    """corpus.py: the eSpeak NG corpus with train / val / judge manifests (cached by its settings)."""
    run_command(["corpus.py", "--out", p["corpus"], "--speakers", cfg.corpus_speakers, "--utts_per_speaker",
                 cfg.corpus_utts, "--seed", cfg.corpus_seed, "--val_frac", cfg.corpus_val_frac,
                 "--judge_frac", cfg.corpus_judge_frac, "--unseen", cfg.corpus_unseen,
                 "--extra_voices", cfg.corpus_extra_voices, "--extra_utts", cfg.corpus_extra_utts],
                p["run"] / "logs" / "corpus.log")


def step_sv(cfg, p, yamls, overrides):
    """train_sv.py: the tiny_sv speaker encoder on the train split's voices (held-out voices never)."""
    run_command(["train_sv.py", *yamls, *overrides, "--overwrite=true", f"--name={cfg.name}_sv",
                 f"--manifest={p['train']}", f"--val_manifest={p['val']}"], p["run"] / "logs" / "sv.log")


def step_prepare(cfg, p, yamls, overrides):
    """data.py prepare: latents, text features and speaker features of train and val, cached; and of
    the base stage's own training set when the corpus has one (`base_data`). First, when the config
    asks for a mel basis and names no file of its own, data.py fit_codec fits it on the train split."""
    if cfg.codec == "mel" and cfg.mel_basis_dim and Path(cfg.mel_basis) == p["codec_basis"]:
        run_command(["data.py", "fit_codec", *yamls, *overrides, f"--manifest={p['train']}"],
                    p["run"] / "logs" / "fit_codec.log")
    run_command(["data.py", "prepare", *yamls, *overrides, f"--manifest={p['train']}", f"--val_manifest={p['val']}"],
                p["run"] / "logs" / "prepare.log")
    manifest, cache = base_data(cfg, p)
    if "base" in cfg.pipeline and manifest != p["train"]:
        run_command(["data.py", "prepare", *yamls, *overrides, f"--manifest={manifest}",
                     f"--val_manifest={p['val']}", f"--cache_dir={cache}"],
                    p["run"] / "logs" / "prepare_base.log")


def base_data(cfg, p):
    """(manifest, cache directory) the base stage trains on: the corpus's `base.jsonl` (each clip
    also under its voice's own description, corpus.py) in a cache of its own when the corpus has
    one, else the train split every stage uses."""
    if p["base_train"].is_file():
        return p["base_train"], p["base_cache"]
    return p["train"], cfg.cache_dir


def train_stage(stage, ckpt):
    """The step that trains `stage` on top of `ckpt` (a path key of `paths`, or None)."""
    def step(cfg, p, yamls, overrides):
        stage_yaml = [cfg.stage_configs[stage]] if stage in cfg.stage_configs else []
        # a pipeline run redoes its stages: each replaces its previous run (train.py refuses without it)
        manifest, cache = base_data(cfg, p) if stage == "base" else (p["train"], cfg.cache_dir)
        args = ["train.py", *yamls, *stage_yaml, "--overwrite=true", *overrides, f"--stage={stage}",
                f"--name={cfg.name}_{stage}", f"--manifest={manifest}", f"--val_manifest={p['val']}",
                f"--cache_dir={cache}", f"--ckpt={p[ckpt] if ckpt else ''}"]
        if stage == "adaln" and cfg.lora_speaker:  # stage 2 starts from the AdaLN trained with the LoRA
            args.append(f"--adaln_init={p['lora_dir'] / STAGE_OUTPUT['adaln']}")
        # train_processes > 1: the same command under torchrun, one process per GPU (or gloo CPU process)
        n = cfg.train_processes
        launcher = ("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}") if n > 1 else ()
        run_command(args, p["run"] / "logs" / f"{stage}.log", launcher)
        if not p[stage].is_file():
            raise RuntimeError(f"train.py --stage={stage} finished without writing {p[stage]}")
    return step


def step_merge(cfg, p, yamls, overrides):
    """merge.py: the stage-1 LoRA folded into the base DiT, in the base's dtype."""
    run_command(["merge.py", "--ckpt", p["base"], "--lora", p["lora"], "--out", p["merged"], "--dtype", "keep"],
                p["run"] / "logs" / "merge.log")


def reference_clips(manifest, which=0):
    """(prompts, their clips' durations in s, {speaker: clip}) of a corpus manifest: every prompt, and
    one reference per speaker, its `which`-th clip (0: the first)."""
    import soundfile as sf

    rows = [json.loads(line) for line in open(manifest, encoding="utf-8") if line.strip()]
    clips = [str((Path(manifest).parent / r["audio"]).resolve()) for r in rows]
    per_speaker = {}
    for r, clip in zip(rows, clips):
        per_speaker.setdefault(r["speaker"], []).append(clip)
    short = sorted(s for s, c in per_speaker.items() if len(c) <= which)
    if short:
        raise ValueError(f"{manifest}: speakers {short} have no clip number {which + 1} to be a reference")
    refs = {s: c[which] for s, c in per_speaker.items()}
    return [r["text"] for r in rows], [sf.info(c).duration for c in clips], refs


def sample_plan(cfg, p):
    """(prompts, durations in s, {seen speaker: reference clip}, {held-out speaker: clip}) the sample
    step speaks: held out, the first `sample_prompts` val prompts and each voice's first val clip;
    development, the next as many prompts and each voice's second clip (seen and held-out voices alike)."""
    development = cfg.sample_split == "development"
    prompts, durations, refs = reference_clips(p["val"], which=int(development))
    n = cfg.sample_prompts or len(prompts)
    start = n if development else 0
    if start + n > len(prompts):
        raise ValueError(f"{p['val']}: sample_split development needs {2 * n} val prompts (twice sample_prompts "
                         f"{cfg.sample_prompts}), the manifest has {len(prompts)}")
    unseen = reference_clips(p["val_unseen"], which=int(development))[2] if cfg.corpus_unseen else {}
    return prompts[start:start + n], durations[start:start + n], refs, unseen


def step_sample(cfg, p, yamls, overrides):
    """Every validation prompt x one held-out reference per speaker, for each of VARIANTS."""
    import audio
    import sample as sample_lib

    prompts, durations, refs, unseen = sample_plan(cfg, p)
    refs = {**refs, **unseen}  # held-out voices speak the same prompts; their samples say seen: false
    # the config that made the cache (no `ckpt`: the text projection is the seeded random one)
    p["data_config"].write_text(json.dumps({"config": {**config_dict(cfg), "ckpt": "", "stage": "adaln"}}))
    # Each prompt is spoken for as long as its own corpus clip: the model was trained on 1-4 s clips,
    # and DramaBox's estimate (duration.estimate_duration, >= 3 s + padding) would ask for 2-3x more.
    items = [(prompt, spk, seed, seconds) for prompt, seconds in zip(prompts, durations)
             for spk in sorted(refs) for seed in cfg.sample_seeds]
    for variant in VARIANTS:
        t0 = time.time()
        adaln = variant != "baseline"
        args = sample_lib.parse_args(["--ckpt", str(p["merged"]), "--config", str(p["data_config"]),
                                      "--device", cfg.device, "--ref_mode", "adaln" if adaln else "none"]
                                     + (["--adaln", str(p["adaln"])] if adaln else []))
        device = sample_lib.resolve_device(args.device)
        dtype = sample_lib.compute_dtype(device, cfg.dtype)
        model, codec, text_encoder, connector, adaln_net, speaker = sample_lib.load_pipeline(args, device, dtype)
        spk_cfg = cfg.sample_spk_cfg if variant == "adaln_guided" else 1.0
        settings = dict(steps=cfg.sample_steps, cfg=cfg.sample_cfg, stg=0.0, spk_cfg=spk_cfg, rescale=0.0,
                        temperature=cfg.sample_temperature, eta=cfg.sample_eta, batch_size=cfg.sample_batch,
                        shift_tokens=cfg.sample_shift_tokens or None, sigma_last=cfg.sample_sigma_last,
                        spk_sigma=tuple(cfg.sample_spk_sigma) if variant == "adaln_guided" else (0.0, 1.0))
        # The baseline never hears the reference: one generation per (prompt, seed, length) is every
        # voice's sample (the same audio, bit for bit), so it is made once, not once per voice.
        keys = [item if adaln else (item[0], None, *item[2:]) for item in items]
        unique = list(dict.fromkeys(keys))
        made = sample_lib.sample(model, codec, text_encoder, connector, [k[0] for k in unique],
                                 seeds=[k[2] for k in unique], ref_wavs=[refs.get(k[1]) for k in unique],
                                 ref_mode="adaln" if adaln else "none", adaln=adaln_net, speaker=speaker,
                                 duration=[k[3] for k in unique], device=device, dtype=dtype, **settings)
        position = {k: i for i, k in enumerate(unique)}
        wavs = [made[position[k]] for k in keys]
        for group in ("", "_unseen"):  # held-out voices apart: the MLP judge knows only the seen ones
            out_dir = p["samples"] / f"{variant}{group}"
            if out_dir.is_dir():
                shutil.rmtree(out_dir)  # a previous run's samples would be scored with these
        for k, ((prompt, spk, seed, seconds), wav) in enumerate(zip(items, wavs)):
            out_dir = p["samples"] / (f"{variant}_unseen" if spk in unseen else variant)
            out_dir.mkdir(parents=True, exist_ok=True)
            path = out_dir / f"{k:04d}_{spk}_seed{seed}.wav"
            meta = {"variant": variant, "prompt": prompt, "speaker": spk, "seen": spk not in unseen,
                    "ref": refs[spk], "seed": seed,
                    "duration_s": round(seconds, 2),
                    "ckpt": str(p["merged"]), "adaln": str(p["adaln"]) if adaln else None, **settings}
            audio.write_wav(path, wav, codec.output_rate, meta)
        print(f"    {variant}: {len(wavs)} samples ({len(unique)} generated) in {time.time() - t0:.1f} s -> "
              f"{p['samples'] / variant}"
              + ("{,_unseen}" if unseen else ""), flush=True)


def step_asr(cfg, p, yamls, overrides):
    """asr.py: the evaluation-only recogniser, trained on the train split's real clips and tested on the
    judge split's (other sentences of the same voices): its error rate there is what real speech scores."""
    run_command(["asr.py", "--manifest", p["train"], "--test", p["judge_split"], "--out", p["asr"],
                 "--seed", cfg.seed, "--steps", cfg.asr_steps], p["run"] / "logs" / "asr.log")


def step_eval(cfg, p, yamls, overrides):
    """Both speaker judges on every variant, seen and held-out voices apart, into judge.json; the
    HTML report. The headline is the independent GE2E encoder (voice_encoder.py): a network the
    generator never met, identifying each sample against centroids of the corpus's judge clips.
    The MLP judge (judge.py) works on log-mel statistics, the space a `mel_stats`-conditioned
    speaker path is fed and trained in (it flatters such a path), so it is shown beside it, never alone."""
    import judge as judge_lib

    t0 = time.time()
    wavs, speakers = judge_lib.load_split(p["judge_split"])
    judge = judge_lib.train_judge(wavs, speakers, seed=cfg.seed)
    judge_lib.save_judge(judge, p["judge"])
    print(f"    judge: trained on {len(wavs)} real clips of {len(judge.speakers)} speakers in "
          f"{time.time() - t0:.1f} s", flush=True)
    samples = {v: load_samples(p["samples"] / v) for v in VARIANTS + tuple(f"{v}_unseen" for v in VARIANTS)}
    samples = {v: s for v, s in samples.items() if s[0]}
    results = {}
    with judge_lib.one_thread():
        val_wavs, val_speakers = judge_lib.load_split(p["val"])
        results["real_val"] = judge_lib.judge_report(judge, val_wavs, val_speakers)  # the judge's own test
        for variant in VARIANTS:
            if variant in samples:
                results[variant] = judge_lib.judge_report(judge, *samples[variant])
    report = {"chance": 1.0 / len(judge.speakers), "speakers": judge.speakers, "judge_clips": len(wavs),
              **{k: {m: v[m] for m in ("n", "accuracy", "margin", "per_speaker")} for k, v in results.items()},
              "ge2e": ge2e_report(cfg, p, samples)}
    p["judge_json"].write_text(json.dumps(report, indent=1))
    print(f"    judges scored {sum(len(s[0]) for s in samples.values())} samples in {time.time() - t0:.1f} s",
          flush=True)
    dirs = [str(p["samples"] / v) for v in VARIANTS if v in samples]
    asr = ["--asr", p["asr"]] if "cer" in cfg.eval_metrics.split(",") else []  # main() checked it is there
    curves = [f"{stage}={p[f'{stage}_dir'] / 'metrics.jsonl'}" for stage in STAGE_OUTPUT
              if (p[f"{stage}_dir"] / "metrics.jsonl").is_file()]
    # DNSMOS on a spread subset, first 9 s window only: every window of every sample would take minutes
    run_command(["eval.py", "--samples", *dirs, "--baseline", "baseline", "--judge", p["judge"],
                 "--metrics", cfg.eval_metrics, "--ge2e_split", p["judge_split"], "--dnsmos_windows", 1,
                 "--dnsmos_per_variant", cfg.eval_dnsmos_clips, "--player_rate", REPORT_PLAYER_RATE,
                 *asr, "--out", p["report"], "--scores", p["scores"], "--title", f"speakerbox pipeline: {cfg.name}",
                 *(["--metrics_jsonl", *curves] if curves else [])],
                p["judge_json"].parent / "logs" / "eval.log")


def load_samples(directory):
    """([clip (N,) at 16 kHz], [reference speaker]) of a sample directory (empty when absent)."""
    clips, speakers = [], []
    if directory.is_dir():
        for side in sorted(directory.glob("*.json")):
            clips.append(read_wav(side.with_suffix(".wav")))
            speakers.append(json.loads(side.read_text())["speaker"])
    return clips, speakers


def ge2e_report(cfg, p, samples):
    """GE2E identification {seen | unseen: {real_val | variant: voice_encoder.identify(...)}}: every
    clip against the centroids of its group's judge clips (seen voices: `judge`, held-out voices:
    `judge_unseen`), so chance is 1 / voices in the group."""
    import judge as judge_lib
    import voice_encoder

    encoder = voice_encoder.load_encoder()
    out = {}
    for group, judge_split, val_split in (("seen", "judge_split", "val"), ("unseen", "judge_unseen", "val_unseen")):
        if group == "unseen" and not cfg.corpus_unseen:
            continue
        wavs, speakers = judge_lib.load_split(p[judge_split])
        centroids = voice_encoder.centroids_from_clips(voice_encoder.embed(encoder, wavs), speakers)
        suffix = "" if group == "seen" else "_unseen"
        real = judge_lib.load_split(p[val_split])
        sets = {"real_val": real, **{v: samples[f"{v}{suffix}"] for v in VARIANTS if f"{v}{suffix}" in samples}}
        out[group] = {name: voice_encoder.identify(voice_encoder.embed(encoder, clips), spk, centroids)
                      for name, (clips, spk) in sets.items()}
    return out


def read_wav(path):
    """A wav file as a mono float32 tensor (N,) at the judges' 16 kHz."""
    import soundfile as sf
    import torch

    import audio

    data, rate = sf.read(path, dtype="float32", always_2d=True)
    return audio.resample(torch.from_numpy(data.mean(1)), rate, audio.SAMPLE_RATE)


STEP_FUNCTIONS = {"corpus": step_corpus, "sv": step_sv, "prepare": step_prepare, "base": train_stage("base", None),
                  "lora": train_stage("lora", "base"), "merge": step_merge, "adaln": train_stage("adaln", "merged"),
                  "sample": step_sample, "asr": step_asr, "eval": step_eval}


# -----------------------------------------------------------------------------------------------
# summary


def last_validation(metrics_path):
    """The last held-out record (a line with `val_loss`) of a training run's metrics.jsonl, or None."""
    from eval import read_metrics_jsonl

    if not metrics_path.is_file():
        return None
    records = [r for r in read_metrics_jsonl(metrics_path) if "val_loss" in r]
    return {k: v for k, v in records[-1].items() if k.startswith("val_") or k == "step"} if records else None


def word_scores(p):
    """{variant: {cer, cer_chance}} means of eval.py's per-sample scores, plus "real_test": the recogniser's
    character error rate on real judge clips (from its file); None without cer scores."""
    import files

    scores = json.loads(p["scores"].read_text())["scores"] if p["scores"].is_file() else {}
    if not scores.get("cer"):
        return None
    out = {}
    for metric in ("cer", "cer_chance"):
        for sid, value in scores.get(metric, {}).items():
            out.setdefault(sid.split("/")[0], {}).setdefault(metric, []).append(value)
    out = {v: {m: round(sum(x) / len(x), 4) for m, x in d.items()} for v, d in out.items()}
    if p["asr"].is_file():
        out["real_test"] = (files.read_json_metadata(p["asr"], "summary") or {}).get("test_cer")
    return out


def summarize(cfg, p, times):
    """The summary dict (also written to summary.json) and its printable table."""
    judge = json.loads(p["judge_json"].read_text()) if p["judge_json"].is_file() else None
    validation = {stage: last_validation(p[f"{stage}_dir"] / "metrics.jsonl") for stage in STAGE_OUTPUT}
    validation = {stage: v for stage, v in validation.items() if v}
    summary = {"name": cfg.name, "config": config_dict(cfg), "times_s": times,
               "total_s": round(sum(times.values()), 1), "load": os.getloadavg(),
               "artefacts": {k: str(p[k]) for k in ("corpus", "base", "lora", "merged", "adaln", "samples",
                                                     "judge", "judge_json", "report") if p[k].exists()},
               "validation": validation, "judge": judge, "words": word_scores(p)}
    lines = ["", f"pipeline {cfg.name}: done in {summary['total_s']:.0f} s "
             f"(load average {summary['load'][0]:.1f} on {os.cpu_count()} cores)",
             f"  {'step':<8} {'wall s':>8}"]
    lines += [f"  {k:<8} {v:>8.1f}" for k, v in times.items()]
    if validation:
        lines.append("  held-out flow loss, and how much it rises with another clip's words (~0: words ignored)")
        for stage, v in validation.items():
            gain = v.get("val_text_gain", float("nan"))
            lines.append(f"  {stage:<8} val_loss {v['val_loss']:.4f}   val_text_gain {gain:+.5f}")
    if judge:
        lines.append("  speaker identification: accuracy (x chance) margin; GE2E = independent encoder,"
                     " MLP = log-mel judge")
        lines.append(f"  {'':<13} {'GE2E seen':>22} {'GE2E unseen':>22} {'MLP seen':>22}")
        ge2e = judge.get("ge2e", {})
        cell = lambda r, chance: f"{r['accuracy']:.3f} ({r['accuracy'] / chance:.1f}x) {r['margin']:+.3f}" if r else "-"
        for v in ("real_val",) + VARIANTS:
            seen, unseen = ge2e.get("seen", {}).get(v), ge2e.get("unseen", {}).get(v)
            cells = [cell(seen, seen and seen["chance"]), cell(unseen, unseen and unseen["chance"]),
                     cell(judge.get(v), judge["chance"])]
            lines.append(f"  {v:<13} " + " ".join(f"{c:>22}" for c in cells))
    words = summary["words"]
    if words:
        real = words.get("real_test")
        lines.append("  words: character error rate of the asr.py transcript vs the prompt (chance: vs the other"
                     " prompts)" + (f"; real judge clips {real:.3f}" if real is not None else ""))
        lines += [f"  {v:<13} {words[v]['cer']:.3f} (chance {words[v].get('cer_chance', float('nan')):.3f})"
                  for v in VARIANTS if v in words]
    if p["report"].is_file():
        lines.append(f"  report: {p['report']}")
    lines.append(f"  summary: {p['summary']}")
    return summary, "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    yamls, overrides = split_argv(argv)
    cfg = load_config(argv)
    check_config(cfg, yamls)
    p = paths(cfg)
    if ("eval" in cfg.pipeline and "cer" in cfg.eval_metrics.split(",") and "asr" not in cfg.pipeline
            and not p["asr"].is_file()):
        raise FileNotFoundError(f"eval_metrics has cer, but the recogniser {p['asr']} is not there and the pipeline "
                                "does not train it: add the asr step (pipeline: [..., asr, eval])")
    p["summary"].parent.mkdir(parents=True, exist_ok=True)  # the run, or its development/ folder
    if "tiny_sv" in cfg.speaker_extractors and "tiny_sv" not in cfg.speaker_paths:
        # the encoder the `sv` step trains (or trained in an earlier run of this name) feeds every stage
        cfg.speaker_paths = {**cfg.speaker_paths, "tiny_sv": str(p["sv"])}
        overrides = [*overrides, f"--speaker_paths={json.dumps(cfg.speaker_paths)}"]
    if cfg.codec == "mel" and cfg.mel_basis_dim and not cfg.mel_basis:
        # the basis the `prepare` step fits on the train split (or fitted in an earlier run of this name)
        cfg.mel_basis = str(p["codec_basis"])
        overrides = [*overrides, f"--mel_basis={cfg.mel_basis}"]
    # On shared cores one thread per process is several times faster than two (a thread that is
    # descheduled stalls every parallel op of the other at its barrier); alone on the machine, every
    # core is (cpu_threads 0). Reset on every call, and the caller's
    # torch threads restored at the end: one process may run several pipelines (the tests).
    import torch

    THREAD_ENV.clear()
    if cfg.cpu_threads:
        THREAD_ENV.update(OMP_NUM_THREADS=str(cfg.cpu_threads), MKL_NUM_THREADS=str(cfg.cpu_threads))
    caller_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.cpu_threads or os.cpu_count() or 1)
    times = {}
    t_start = time.time()
    try:
        for k, step in enumerate(cfg.pipeline, 1):
            print(f"[{k}/{len(cfg.pipeline)}] {step} (elapsed {time.time() - t_start:.0f} s)", flush=True)
            t0 = time.time()
            STEP_FUNCTIONS[step](cfg, p, yamls, overrides)
            times[step] = round(time.time() - t0, 1)
            print(f"[{k}/{len(cfg.pipeline)}] {step} done in {times[step]:.1f} s", flush=True)
    finally:
        torch.set_num_threads(caller_threads)
    summary, table = summarize(cfg, p, times)
    p["summary"].write_text(json.dumps(summary, indent=1, default=str))
    print(table)
    return summary


if __name__ == "__main__":
    main()
