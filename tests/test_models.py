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
