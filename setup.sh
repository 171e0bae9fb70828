#!/usr/bin/env bash
# Install speakerbox into ./.venv:   bash setup.sh          (runtime)
#                                   bash setup.sh --dev    (+ test references: pytest, ltx-core, peft, onnxruntime, librosa)
# Only pip packages are needed: no model weights or datasets are downloaded.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
PIP=(.venv/bin/python -m pip install -q)
"${PIP[@]}" --upgrade pip
# torch and torchaudio in ONE command: torchaudio 2.11 only loads against torch 2.11, and pip
# otherwise upgrades torch under it.
"${PIP[@]}" torch==2.11.0 torchaudio==2.11.0
"${PIP[@]}" -r requirements.txt
if [ "${1:-}" = "--dev" ]; then "${PIP[@]}" -r requirements-dev.txt; fi
# The GE2E speaker encoder's weights for eval.py (voice_encoder.py reads the wheel's pretrained.pt
# and never imports the package): --no-deps keeps librosa and webrtcvad out of the runtime install
# (the dev test installs them to compare against the package). Last, so that pip's resolver does
# not complain about those missing dependencies while it installs the rest.
"${PIP[@]}" --no-deps resemblyzer==0.1.4
.venv/bin/python -c "import torch, torchaudio; print('speakerbox env ready: torch', torch.__version__, 'torchaudio', torchaudio.__version__)"
