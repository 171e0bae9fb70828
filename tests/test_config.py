"""The flat config is strict: unknown keys and wrong types fail naming the key and the source."""

import pytest

from config import Config, config_dict, load_config


def test_defaults_and_precedence(tmp_path):
    a = tmp_path / "a.yaml"
    a.write_text("lr: 3.0e-4\nmax_steps: 7\n")
    b = tmp_path / "b.yaml"
    b.write_text("max_steps: 9\nlora_targets: [audio, audio_v2a]\n")
    cfg = load_config([str(a), str(b), "--lr=1e-5", "--skip_bad=true", "--sources={a: 0.5, b: 0.5}"])
    assert cfg.lr == 1e-5 and cfg.max_steps == 9 and cfg.skip_bad is True
    assert cfg.lora_targets == ["audio", "audio_v2a"]
    assert cfg.sources == {"a": 0.5, "b": 0.5}
    assert config_dict(load_config([])) == config_dict(Config())


def test_cli_list_forms():
    assert load_config(["--lora_targets=audio,audio_v2a"]).lora_targets == ["audio", "audio_v2a"]
    assert load_config(["--lora_targets=[attn_all]"]).lora_targets == ["attn_all"]
    assert load_config(["--lora_targets="]).lora_targets == []
    assert load_config(["--sources="]).sources == {}


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 1e-4\nlearning_rate: 3\n")
    with pytest.raises(KeyError, match=r"learning_rate.*bad\.yaml"):
        load_config([str(bad)])


def test_unknown_key_on_cli():
    with pytest.raises(KeyError, match="max_step'"):
        load_config(["--max_step=3"])


@pytest.mark.parametrize("arg, key", [("--max_steps=abc", "max_steps"), ("--lr=fast", "lr"),
                                      ("--skip_bad=maybe", "skip_bad"), ("--sources=[1, 2]", "sources")])
def test_wrong_type_names_key(arg, key):
    with pytest.raises(TypeError, match=key):
        load_config([arg])


def test_yaml_wrong_type(tmp_path):
    bad = tmp_path / "t.yaml"
    bad.write_text("micro_batch: [1, 2]\n")
    with pytest.raises(TypeError, match=r"micro_batch.*t\.yaml"):
        load_config([str(bad)])


def test_override_needs_equals():
    with pytest.raises(ValueError, match="--key=value"):
        load_config(["--lr"])


def test_shipped_configs_parse():
    import glob

    paths = sorted(glob.glob("configs/*.yaml"))
    assert paths
    for path in paths:
        load_config([path])
