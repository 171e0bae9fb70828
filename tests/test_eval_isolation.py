"""The evaluation yardstick stays out of training: importing the training path (train.py and what it
builds on: losses, speaker features, SpeakerAdaLNZero, data) never loads voice_encoder.py or the
resemblyzer package, directly or through another module. Each import runs in a fresh interpreter,
so nothing a test imported before can hide or fake a dependency; planted modules show that the
check catches a direct and a transitive import."""

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINING_PATH = ["train", "train_sv", "losses", "speaker", "adaln", "data"]
FORBIDDEN = ["voice_encoder", "resemblyzer", "asr"]

CHECK = textwrap.dedent("""
    import importlib, json, sys
    found = {}
    for name in sys.argv[1:]:
        importlib.import_module(name)
        found[name] = [m for m in %r if m in sys.modules or any(k.startswith(m + ".") for k in sys.modules)]
    print(json.dumps(found))
""" % (FORBIDDEN,))


def forbidden_imports(modules, path=()):
    """{module: forbidden modules loaded once it (and the ones before it) is imported}, from a fresh
    interpreter whose import path is `path` then the repo."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([*map(str, path), ROOT])}
    proc = subprocess.run([sys.executable, "-c", CHECK, *modules], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_training_path_never_imports_the_yardstick():
    found = forbidden_imports(TRAINING_PATH)
    assert set(found) == set(TRAINING_PATH)
    assert all(not v for v in found.values()), found


def test_the_check_catches_planted_imports(tmp_path):
    """A module importing the yardstick, one importing that module, and one importing a package
    named resemblyzer (a stand-in here: the real one pulls in librosa) are all caught."""
    (tmp_path / "direct.py").write_text("import voice_encoder\n")
    (tmp_path / "transitive.py").write_text("from direct import *\n")
    (tmp_path / "resemblyzer").mkdir()
    (tmp_path / "resemblyzer" / "__init__.py").write_text("")
    (tmp_path / "uses_package.py").write_text("import resemblyzer\n")
    assert forbidden_imports(["transitive"], [tmp_path]) == {"transitive": ["voice_encoder"]}
    assert forbidden_imports(["uses_package"], [tmp_path]) == {"uses_package": ["resemblyzer"]}
    assert forbidden_imports(["losses", "direct"], [tmp_path]) == {"losses": [], "direct": ["voice_encoder"]}
