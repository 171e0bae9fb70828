"""The flat config is strict: unknown keys and wrong types fail naming the key and the source."""

import pytest

from config import Config, config_dict, load_config, run_cli


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


@pytest.mark.parametrize("arg, key", [("--device=gpu", "device"), ("--dtype=fp8", "dtype"),
                                      ("--micro_batch=0", "micro_batch"), ("--max_steps=-1", "max_steps"),
                                      ("--val_every=0", "val_every"), ("--lr=nan", "lr"), ("--beta2=1", "beta2"),
                                      ("--global_batch=6", "micro_batch"), ("--clone_probs=[0,0]", "clone_probs"),
                                      ("--stage=lora2", "stage"), ("--aux_losses=[spkr]", "aux_losses"),
                                      ("--sample_sigma_last=0", "sample_sigma_last"),
                                      ("--sample_sigma_last=1", "sample_sigma_last"),
                                      ("--sample_spk_sigma=[0.5,0.4]", "sample_spk_sigma"),
                                      ("--sample_spk_sigma=[0.5]", "sample_spk_sigma"),
                                      ("--sample_split=test", "sample_split")])
def test_values_out_of_domain_name_key_and_source(arg, key):
    with pytest.raises(ValueError, match=rf"config key '{key}' \(from the command line\)"):
        load_config(["--global_batch=8", "--micro_batch=4", arg])


def test_value_error_names_the_yaml_that_set_it(tmp_path):
    bad = tmp_path / "d.yaml"
    bad.write_text("device: gpu\n")
    with pytest.raises(ValueError, match=r"'device' \(from .*d\.yaml\): 'gpu' is not one of auto \| cpu \| cuda"):
        load_config([str(bad)])


@pytest.mark.parametrize("text, problem", [("- lr: 1\n- max_steps: 2\n", "not a list"),
                                           ("lr: [1\n", "not valid YAML at line"),
                                           (b"lr: \xff\xfe\n", "not a UTF-8 text file")])
def test_yaml_that_is_not_a_mapping(tmp_path, text, problem):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=rf"bad\.yaml: .*{problem}"):
        load_config([str(bad)])


def test_bare_bool_flag():
    assert load_config(["--resume"]).resume is True
    with pytest.raises(ValueError, match="--key=value"):
        load_config(["--max_steps"])


def _fails(argv):
    raise KeyError("unknown config key 'x' in the command line")


def test_run_cli_one_line_exit_1(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(_fails, ["--lr=1"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: unknown config key 'x'") and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--debug", "--debug=true"])
def test_run_cli_debug_raises(flag):
    with pytest.raises(KeyError):
        run_cli(_fails, [flag])


def test_run_cli_leaves_bugs_alone():
    def buggy(argv):
        raise ZeroDivisionError("a bug, not bad input")

    with pytest.raises(ZeroDivisionError):
        run_cli(buggy, [])
