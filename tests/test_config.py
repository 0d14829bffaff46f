import pytest

from raymed.config import apply_overrides, load_yaml, save_config
from raymed.experiment import load_config, validate_config
from raymed.errors import ConfigError


def test_embedded_default_is_valid_and_resolved():
    cfg = load_config()
    assert cfg.strategy.name == "fedavg" and cfg.strategy.params == {"server_lr": 1.0, "weighting": "uniform"}
    assert cfg.data.partition == "modality" and cfg.clients.num == 20


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["strategy.name=fedprox", "data.partition=dirichlet"])
    assert cfg.strategy.params["mu"] == 0.01  # method default filled in
    assert cfg.data.alpha == 0.5  # partition default filled in
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_overrides_parse_yaml_values():
    raw = apply_overrides({}, ["data.datasets=[breastmnist,retinamnist]", "clients.lr=0.1", "eval.personalised=false"])
    assert raw == {"data": {"datasets": ["breastmnist", "retinamnist"]}, "clients": {"lr": 0.1}, "eval": {"personalised": False}}


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["clients.frction=0.5"], ["unknown key clients.frction", "did you mean clients.fraction", "allowed keys here"]),
        (["clients.fraction=1.5"], ["clients.fraction", "1.5", "less than or equal to 1"]),
        (["clients.num=many"], ["clients.num", "'many'", "integer"]),
        (["data.partition=random"], ["data.partition", "'random'", "'iid', 'dirichlet', 'client_dirichlet', 'quantity', 'modality' or 'by_site'"]),
        (["data.datasets=[pneumoniamnst]"], ["data.datasets", "did you mean pneumoniamnist", "allowed:"]),
        (["data.datasets=[pneumoniamnist,adrenalmnist3d]"], ["mixes 2D and 3D", "fedkim"]),
        (["strategy.name=fedsgd"], ["strategy.name", "'fedsgd'", "allowed: central, ditto, dpfedavg, fedadagrad, fedadam, fedavg, fedavgm, fedbn, fedkim, fedmrg, fedper, fedprox, fedyogi, krum"]),
        (["strategy.name=fedprox", "strategy.mu=-1"], ["strategy.mu", "-1", "greater than or equal to 0"]),
        (["strategy.name=fedavg", "strategy.mu=0.1"], ["unknown key strategy.mu", "server_lr"]),
        (["model.name=vit"], ["model.name", "'vit'", "cnn", "resnet18"]),
        (["nonsense=1"], ["unknown key nonsense"]),
    ],
)
def test_bad_values_name_key_value_and_allowed(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, (part, message)


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1, 2\nseed: 0\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(tmp_path / "list.yaml")


def test_bad_set_syntax():
    with pytest.raises(ConfigError, match="key.path=value"):
        validate_config(apply_overrides({}, ["rounds"]))
