import pytest
import torch

from raymed.data.tasks import TaskSpec
from raymed.models import MODELS, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_take_2d_and_3d_any_channels_with_a_head_per_task(name):
    tasks2d = {"pneumoniamnist": TaskSpec.from_medmnist("pneumoniamnist"), "retinamnist": TaskSpec.from_medmnist("retinamnist")}
    model = build_model(name, tasks2d, seed=0)
    assert model.in_channels == 3  # gray and RGB datasets share an RGB model
    x = torch.randn(2, 3, 28, 28)
    assert model(x, "pneumoniamnist").shape == (2, 2)
    assert model(x, "retinamnist").shape == (2, 5)  # ordinal under CE (the default): one logit per grade
    cumulative = build_model(name, {"retinamnist": TaskSpec("retinamnist", "ordinal", 5, 3, 2, ordinal_loss="cumulative")}, seed=0)
    assert cumulative(x, "retinamnist").shape == (2, 4)  # 5 grades → 4 cumulative logits
    assert sorted(k for k in model.state_keys(["retinamnist"]) if k.startswith("heads.")) == [
        "heads.retinamnist.bias",
        "heads.retinamnist.weight",
    ]
    tasks3d = {"adrenalmnist3d": TaskSpec.from_medmnist("adrenalmnist3d")}
    model3d = build_model(name, tasks3d, seed=0)
    assert model3d(torch.randn(2, 1, 28, 28, 28), "adrenalmnist3d").shape == (2, 2)


def test_same_seed_same_initialisation():
    tasks = {"breastmnist": TaskSpec.from_medmnist("breastmnist")}
    a, b, c = build_model("cnn", tasks, 1), build_model("cnn", tasks, 1), build_model("cnn", tasks, 2)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


def test_normalised_cnns_name_their_norm_layers_and_group_norm_keeps_no_running_statistics():
    """FedBN-style studies select the normalisation layers by name (``.norm1.``); GroupNorm has no
    running statistics (nothing but weights to average), BatchNorm's are buffers in the state."""
    import re

    tasks = {"breastmnist": TaskSpec.from_medmnist("breastmnist")}
    norm = re.compile(r"^backbone\.body\.block\d\.norm\d\.")
    gn, bn = build_model("cnn_gn", tasks, 0), build_model("cnn_bn", tasks, 0)
    assert set(gn.state_dict()) == {name for name, _ in gn.named_parameters()}
    gn_norm = [k for k in gn.state_dict() if norm.match(k)]
    assert len(gn_norm) == 6 and all(k.endswith((".weight", ".bias")) for k in gn_norm)  # 3 blocks x (weight, bias)
    bn_norm = [k for k in bn.state_dict() if norm.match(k)]
    assert {k.rsplit(".", 1)[1] for k in bn_norm} == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    assert not [k for k in bn.state_dict() if ("running_" in k or "num_batches" in k) and not norm.match(k)]
    # the same image size does not matter: global average pooling, no size-bound dense layer
    for size in (28, 64):
        assert gn(torch.randn(2, 1, size, size), "breastmnist").shape == (2, 2)


def test_a_group_norm_federation_trains_with_fedper_heads_kept_on_the_clients(data_dir, tmp_path, ray_session):
    import pyarrow.parquet as pq

    from raymed.engine import run_experiment
    from safetensors.numpy import load_file

    from tests.conftest import small_config

    cfg = small_config(data_dir, tmp_path, "model.name=cnn_gn", "strategy.name=fedper", "rounds=2", "clients.local_steps=4", "clients.max_local_epochs=1")
    run_dir = run_experiment(cfg)
    rounds = pq.read_table(run_dir / "rounds.parquet").to_pandas()
    assert rounds["personal/client_mean/acc"].notna().all() and (rounds["comm/bytes_up"] > 0).all()
    saved = load_file(str(run_dir / "model.safetensors"))
    assert any(".norm1." in k for k in saved) and not any("running_" in k for k in saved)
