"""Config loading: defaults, overrides, and one-line errors naming the YAML path and rule."""

import pytest

from ssam_tune.training.config import Config, ConfigError, config_from_dict, config_to_dict, load_config


def test_defaults_are_the_paper_recipe():
    cfg = config_from_dict({})
    assert isinstance(cfg, Config)
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.momentum) == (128, 0.05, 0.9)
    assert cfg.method.normalize == "auto" and cfg.method.N_F == 128 and cfg.method.alpha == 0.5
    assert cfg.data.name == "embedded"
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_yaml_file_with_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  name: vgg11_bn\ntrain:\n  weight_decay: 5e-4\nmethod:\n  name: sam\n")
    cfg = load_config(p, ["method.rho=0.05", "train.epochs=3", "data.root=/x"])
    assert cfg.model.name == "vgg11_bn" and cfg.train.weight_decay == 5e-4  # YAML 1.1 "5e-4" string
    assert cfg.method.rho == 0.05 and cfg.train.epochs == 3 and cfg.data.root == "/x"


@pytest.mark.parametrize("data, path, rule", [
    ({"method": {"rho": -0.1}}, "method.rho", "must be in [0.0, 10.0], got -0.1"),
    ({"method": {"sparsity": 1.0}}, "method.sparsity", "must be in [0.0, 1.0), got 1.0"),
    ({"method": {"name": "adam"}}, "method.name", "must be one of sgd, sam, ssam_f, ssam_d, ssam_random"),
    ({"method": {"T_m": 0}}, "method.T_m", "must be in [1, 100000], got 0"),
    ({"method": {"N_F": 0}}, "method.N_F", "must be in [1, 1000000], got 0"),
    ({"method": {"drop": "widest"}}, "method.drop", "must be one of flattest, random, sharpest"),
    ({"model": {"name": "resnet9"}}, "model.name", "must be one of resnet18"),
    ({"data": {"name": "mnist"}}, "data.name", "must be one of embedded"),
    ({"data": {"val_fraction": 1.0}}, "data.val_fraction", "must be in [0.0, 1.0), got 1.0"),
    ({"train": {"epochs": "ten"}}, "train.epochs", "must be an integer, got 'ten'"),
    ({"train": {"epochs": 2.5}}, "train.epochs", "must be an integer"),
    ({"train": {"nesterov": "yes"}}, "train.nesterov", "must be true or false"),
    ({"train": {"lr": 0}}, "train.lr", "must be in (0.0, 100.0], got 0"),
    ({"train": {"epochs": 2, "warmup_epochs": 2}}, "train.warmup_epochs", "must be < train.epochs"),
    ({"train": {"epoch": 3}}, "train.epoch", "unknown key"),
    ({"optimizer": {}}, "optimizer", "unknown key"),
    ({"train": [1, 2]}, "train.", "must be a mapping"),
    ({"data": {"name": "imagefolder"}}, "data.root", "is required"),
    ({"model": {"depth": 27}}, "model.depth", "6n + 4"),
    ({"train": {"inject_nan_at_step": -1}}, "train.inject_nan_at_step", "must be >= 0, got -1"),
    ({"method": {"rho": float("nan")}}, "method.rho", "must be a finite number, got nan"),
    ({"train": {"lr": float("inf")}}, "train.lr", "must be a finite number"),
])
def test_errors_name_path_and_rule(data, path, rule):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data, source="x.yaml")
    msg = str(info.value)
    assert msg.startswith(f"x.yaml: {path}") and rule in msg and "\n" not in msg


def test_yaml_level_errors(tmp_path):
    cases = {
        "syntax.yaml": ("train: [1, 2\n", "invalid YAML: line"),
        "tag.yaml": ("seed: !!python/object/apply:os.system ['echo hi']\n", "!!python"),
        "dup.yaml": ("train:\n  epochs: 1\n  epochs: 2\n", "duplicate key 'epochs'"),
        "list.yaml": ("- 1\n- 2\n", "must be a mapping"),
    }
    for name, (text, expected) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError, match=expected) as info:
            load_config(tmp_path / name)
        assert name in str(info.value)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="expected key=value"):
        (tmp_path / "ok.yaml").write_text("{}\n")
        load_config(tmp_path / "ok.yaml", ["method.rho"])


def test_one_does_not_apply_rule_and_configs_with_only_the_keys_that_apply():
    from ssam_tune.training.config import applying_config, config_to_dict, flatten, key_applies

    sgd_vgg = config_to_dict(config_from_dict({"model": {"name": "vgg11_bn"}, "data": {"augment": "none"},
                                               "method": {"name": "sgd"}}))
    flat = flatten(sgd_vgg)
    gone = {k for k in flat if not key_applies(flat, k)}
    assert {"method.rho", "method.sparsity", "method.N_F", "method.alpha", "method.T_m", "model.depth",
            "model.widen_factor", "data.cutout", "data.download", "data.num_workers", "train.inject_nan_at_step",
            "train.inject_kill_at_step"} <= gone
    assert {k for k in gone if not k.startswith("method.")} == {
        "model.depth", "model.widen_factor", "data.cutout", "data.download", "data.num_workers",
        "train.inject_nan_at_step", "train.inject_kill_at_step"}
    short = applying_config(sgd_vgg)
    assert not any(k in flatten(short) for k in gone) and short["method"] == {"name": "sgd"}
    assert config_from_dict(short) == config_from_dict(sgd_vgg)  # the same run
    ssam_f = config_to_dict(config_from_dict({"model": {"name": "wrn28_10"}, "method": {"name": "ssam_f"},
                                              "train": {"inject_nan_at_step": 5}}))
    flat = flatten(ssam_f)
    assert key_applies(flat, "model.depth") and key_applies(flat, "method.N_F") and key_applies(flat, "data.cutout")
    assert key_applies(flat, "train.inject_nan_at_step") and not key_applies(flat, "method.alpha")
    assert config_from_dict(applying_config(ssam_f)) == config_from_dict(ssam_f)
