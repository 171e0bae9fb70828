"""The evaluation report, rendered: one self-contained HTML page (nothing is fetched when it is
opened) with the metric summary and its 95% intervals, deltas against a baseline, training loss
curves as inline SVG, and every sample as an embedded Ogg Opus player with its spectrogram, a PNG
written by the tiny encoder here.

eval.py computes the per-sample table {metric: {sample id: value}} and calls `render_html`.
"""

import base64
import html
import io
import json
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from audio import read_mono16k, resample
from intervals import delta_ci, format_ci, summarize

OPUS_RATES = (8000, 12000, 16000, 24000, 48000)  # the only rates Opus encodes


# -----------------------------------------------------------------------------------------------
# images: a tiny PNG encoder, spectrograms, SVG loss curves


def png_bytes(pixels, palette=None):
    """Encode an (H, W, 3) uint8 array as PNG (8-bit truecolour), or (H, W) uint8 indices into a
    (n <= 256, 3) `palette` (8-bit indexed colour: a third of the bytes). Every scanline uses the
    "Up" filter (bytes minus the row above): spectrogram rows are alike, so it compresses better."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8).reshape(pixels.shape[0], -1)  # (H, W * channels)
    h, w = pixels.shape[0], pixels.shape[1] // (3 if palette is None else 1)
    up = pixels - np.concatenate([np.zeros_like(pixels[:1]), pixels[:-1]])  # uint8: modulo 256
    raw = b"".join(b"\x02" + up[y].tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    color = 2 if palette is None else 3
    plte = b"" if palette is None else chunk(b"PLTE", np.asarray(palette, np.uint8).tobytes())
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)) + plte
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))  # 9: 4% smaller, 9x slower


# 16 colours over 80 dB (5 dB steps): side by side with 256 the harmonics look the same, and the
# PNG is 3x smaller, which is what keeps a report of hundreds of samples under 10 MB
SPECTROGRAM_LEVELS = 16
# a perceptual dark-blue -> teal -> yellow ramp (viridis anchor colours)
_RAMP = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64)


def ramp_palette(levels=SPECTROGRAM_LEVELS):
    """(levels, 3) uint8 colours interpolated along _RAMP: the spectrograms' palette."""
    x = np.linspace(0, len(_RAMP) - 1, levels)
    lo = np.floor(x).astype(int).clip(0, len(_RAMP) - 2)
    return (_RAMP[lo] + (x - lo)[:, None] * (_RAMP[lo + 1] - _RAMP[lo])).round().astype(np.uint8)


def spectrogram_png(wav, n_fft=512, hop=160, height=128, max_width=300, floor_db=80.0):
    """PNG of the log-magnitude STFT of a 16 kHz mono tensor (N,), low frequencies at the bottom:
    at most `max_width` columns (the report shows 300 px) in SPECTROGRAM_LEVELS colours."""
    win = torch.hann_window(n_fft)
    if wav.numel() < n_fft:
        wav = torch.nn.functional.pad(wav, (0, n_fft - wav.numel()))
    mag = torch.stft(wav, n_fft, hop, window=win, return_complex=True).abs()  # (F, T)
    db = 20 * torch.log10(mag.clamp(min=1e-8))
    db = (db - db.max()).clamp(min=-floor_db) / floor_db + 1  # 0..1
    img = torch.nn.functional.adaptive_avg_pool2d(db[None, None], (height, min(max_width, db.shape[1])))[0, 0]
    index = (img.flip(0).numpy() * (SPECTROGRAM_LEVELS - 1)).round().clip(0, SPECTROGRAM_LEVELS - 1)
    return png_bytes(index.astype(np.uint8), ramp_palette())


def nice_ticks(lo, hi, count=5):
    """Round tick values (1, 2 or 5 x 10^k apart, at most `count` intervals) covering [lo, hi]."""
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * (1 - 1e-9))
    first = math.floor(lo / step + 1e-9) * step  # 1e-9: 3 / 0.2 is 14.999...
    return [first + k * step for k in range(math.ceil((hi - first) / step - 1e-9) + 1)]


def loss_curves_svg(records, keys=("loss", "val_loss"), width=640, height=240):
    """Inline SVG of `keys` against `step` from metrics.jsonl records: axes with round ticks, a
    line per key and a dot per point of sparse keys (validation runs every few hundred steps,
    often once: a line alone would not show it)."""
    colors = {"loss": "#1f77b4", "val_loss": "#d62728"}
    series = {k: [(r["step"], r[k]) for r in records if k in r and "step" in r and isinstance(r[k], (int, float))
                  and math.isfinite(r[k])] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return "<p>no loss records</p>"
    pts = [p for v in series.values() for p in v]
    xt = nice_ticks(min(p[0] for p in pts), max(max(p[0] for p in pts), min(p[0] for p in pts) + 1))
    yt = nice_ticks(min(p[1] for p in pts), max(max(p[1] for p in pts), min(p[1] for p in pts) + 1e-6))
    left, right, top, bottom = 60, 20, 20, 40  # room for the tick labels
    sx = lambda x: left + (x - xt[0]) / (xt[-1] - xt[0]) * (width - left - right)  # noqa: E731
    sy = lambda y: height - bottom - (y - yt[0]) / (yt[-1] - yt[0]) * (height - top - bottom)  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="loss" '
             f'font-size="11">', f'<rect width="{width}" height="{height}" fill="white" stroke="#ccc"/>']
    for x in xt:
        parts.append(f'<line class="xtick" x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{top}" y2="{height - bottom}" '
                     f'stroke="#eee"/><text x="{sx(x):.1f}" y="{height - bottom + 14}" '
                     f'text-anchor="middle">{x:g}</text>')
    for y in yt:
        parts.append(f'<line class="ytick" x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" '
                     f'stroke="#eee"/><text x="{left - 4}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.4g}</text>')
    parts.append(f'<path d="M{left},{top} V{height - bottom} H{width - right}" fill="none" stroke="#333"/>'
                 f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle">step</text>')
    for i, (k, v) in enumerate(series.items()):
        color = colors.get(k, "#2ca02c")
        if len(v) > 1:
            line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in v)
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{line}"/>')
        if len(v) <= 50:
            parts += [f'<circle class="point" data-key="{k}" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"/>'
                      for x, y in v]
        parts.append(f'<text x="{width - right - 110}" y="{top + 12 + 14 * i}" fill="{color}">'
                     f'{k} ({len(v)} points)</text>')
    parts.append("</svg>")
    return "".join(parts)


# -----------------------------------------------------------------------------------------------
# HTML


def audio_data_uri(path, rate):
    """The file as a base64 `data:` URI: mono Ogg Opus at `rate` (one of OPUS_RATES), or the file's
    own bytes (rate 0)."""
    if not rate:
        return "data:audio/wav;base64," + base64.b64encode(Path(path).read_bytes()).decode()
    if rate not in OPUS_RATES:
        raise ValueError(f"--player_rate {rate}: Opus encodes only {', '.join(map(str, OPUS_RATES))} Hz (or 0)")
    data, sr = sf.read(path, dtype="float32", always_2d=True)
    wav = resample(torch.from_numpy(data.mean(1)), sr, rate)
    buf = io.BytesIO()
    sf.write(buf, wav.clamp(-1, 1).numpy(), rate, format="OGG", subtype="OPUS")  # libopus's default: ~24 kbit/s
    return "data:audio/ogg;base64," + base64.b64encode(buf.getvalue()).decode()


CSS = """body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f3f3f3}
.skipped td{color:#888}.better{color:#080}.worse{color:#b00}img.spec{display:block;width:300px;height:96px}
audio{width:300px}.prompt{max-width:380px}"""


def _spectrogram_img(path):
    spec = base64.b64encode(spectrogram_png(read_mono16k(path))).decode()
    return f"<img class='spec' alt='spectrogram' src='data:image/png;base64,{spec}'>"


def references_html(samples, player_rate):
    """(the References table: each reference clip once, with player and spectrogram, {ref path:
    anchor id}). Samples link to their reference instead of embedding it again."""
    refs = sorted({s["meta"]["ref"] for s in samples if s["meta"].get("ref") and os.path.isfile(s["meta"]["ref"])})
    if not refs:
        return "", {}
    anchors = {ref: f"ref{k}" for k, ref in enumerate(refs)}
    rows = [f"<tr id='{anchors[r]}'><td>{html.escape(r)}</td><td><audio controls class='ref' "
            f"data-ref='{html.escape(r)}' src='{audio_data_uri(r, player_rate)}'></audio></td>"
            f"<td>{_spectrogram_img(r)}</td></tr>" for r in refs]
    return ("<h2>References</h2><table id='references'><tr><th>reference</th><th>audio</th><th>spectrogram</th></tr>"
            + "".join(rows) + "</table>"), anchors


def render_html(samples, table, skipped, *, metric_info=None, baseline=None, curves=None,
                title="speakerbox evaluation", player_rate=16000, settings=None):
    """The whole report as one HTML string: nothing is fetched when it is opened. metric_info:
    {metric: (description, higher is better)} (eval.metric_info); unknown metrics are listed after."""
    metric_info = metric_info or {}
    curves = curves or {}
    e = html.escape
    variants = sorted({s["variant"] for s in samples})
    summary = summarize(samples, table)
    metrics = [m for m in metric_info if m in table] + sorted(m for m in table if m not in metric_info)
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(title)}</title>",
           f"<style>{CSS}</style></head><body><h1>{e(title)}</h1>",
           f"<p>{len(samples)} samples, variants: {', '.join(map(e, variants))}"
           + (f"; baseline: {e(baseline)}" if baseline else "") + ". Mean ± half-width of the 95% t interval.</p>"]

    out.append("<h2>Metrics</h2><table id='summary'><tr><th>metric</th><th>what</th>"
               + "".join(f"<th>{e(v)}</th>" for v in variants) + "</tr>")
    for m in metrics:
        desc = metric_info.get(m, ("", True))[0]
        cells = "".join(f"<td>{format_ci(mean, ci)} <small>(n={n})</small></td>" for n, mean, ci in
                        (summary[m][v] for v in variants))
        out.append(f"<tr data-metric='{e(m)}'><td>{e(m)}</td><td>{e(desc)}</td>{cells}</tr>")
    for m, reason in skipped.items():
        out.append(f"<tr class='skipped' data-metric='{e(m)}'><td>{e(m)}</td><td>{e(metric_info.get(m, ('',))[0])}"
                   f"</td><td colspan='{len(variants)}'>skipped: {e(reason)}</td></tr>")
    out.append("</table>")

    others = [v for v in variants if v != baseline]
    if baseline:
        if baseline not in variants:
            raise ValueError(f"--baseline {baseline!r} is not among the variants {variants}")
        out.append(f"<h2>Deltas vs {e(baseline)}</h2><table id='deltas'><tr><th>metric</th>"
                   + "".join(f"<th>{e(v)} − {e(baseline)}</th>" for v in others) + "</tr>")
        for m in metrics:
            higher = metric_info.get(m, ("", True))[1]
            base_vals = [table[m][s["id"]] for s in samples if s["variant"] == baseline and s["id"] in table[m]]
            cells = []
            for v in others:
                vals = [table[m][s["id"]] for s in samples if s["variant"] == v and s["id"] in table[m]]
                d, ci = delta_ci(vals, base_vals)
                cls = ""
                if math.isfinite(ci) and abs(d) > ci:
                    cls = "better" if (d > 0) == higher else "worse"
                cells.append(f"<td class='{cls}'>{'–' if not math.isfinite(d) else f'{d:+.3f}'}"
                             + (f" ± {ci:.3f}" if math.isfinite(ci) else "") + "</td>")
            out.append(f"<tr data-metric='{e(m)}'><td>{e(m)}</td>{''.join(cells)}</tr>")
        out.append("</table>")

    if curves:
        out.append("<h2>Training curves</h2>")
        for name, records in curves.items():
            out.append(f"<h3>{e(name)}</h3>{loss_curves_svg(records)}")

    refs_table, anchors = references_html(samples, player_rate)
    out.append(refs_table)
    out.append("<h2>Samples</h2><table id='samples'><tr><th>sample</th><th>prompt</th><th>audio</th>"
               "<th>spectrogram</th>" + "".join(f"<th>{e(m)}</th>" for m in metrics) + "</tr>")
    for s in samples:
        meta = s["meta"]
        info = f"seed {meta.get('seed', '?')}" + (f", speaker {meta['speaker']}" if meta.get("speaker") else "")
        ref = meta.get("ref")
        ref_link = f"<br>reference: <a href='#{anchors[ref]}'>{e(Path(ref).name)}</a>" if ref in anchors else ""
        vals = "".join(f"<td>{table[m][s['id']]:.3f}</td>" if s["id"] in table[m] else "<td>–</td>" for m in metrics)
        out.append(f"<tr data-sample='{e(s['id'])}'><td>{e(s['id'])}<br><small>{e(info)}</small></td>"
                   f"<td class='prompt'>{e(str(meta.get('prompt', '')))}</td>"
                   f"<td><audio controls data-sample='{e(s['id'])}' src='{audio_data_uri(s['path'], player_rate)}'>"
                   f"</audio>{ref_link}</td><td>{_spectrogram_img(s['path'])}</td>{vals}</tr>")
    out.append("</table>")
    if settings:
        out.append(f"<h2>Settings</h2><pre>{e(json.dumps(settings, indent=2, default=str))}</pre>")
    out.append("</body></html>")
    return "\n".join(out)
