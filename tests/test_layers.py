"""The import layers of benchmarks/house.py hold: no module imports one of a higher layer (the DiT's
building blocks in layers.py, the frozen encoders in encoders.py and the sampler in sampler.py
exist so that nothing has to), and the check catches an import that climbs."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("house", os.path.join(ROOT, "benchmarks", "house.py"))
house = importlib.util.module_from_spec(spec)
spec.loader.exec_module(house)


def test_no_import_climbs_a_layer():
    up, _, _ = house.climbing(house.modules(ROOT))
    assert up == [], up


def test_a_climbing_import_is_caught(tmp_path):
    (tmp_path / "text.py").write_text("def f():\n    from model import Attention\n")  # inside a function too
    (tmp_path / "model.py").write_text("import layers\n")
    (tmp_path / "layers.py").write_text("import torch\n")
    up, _, _ = house.climbing(house.modules(str(tmp_path)))
    assert up == ["text (components) -> model (model)"]
