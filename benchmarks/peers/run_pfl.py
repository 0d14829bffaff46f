"""The workload in pfl-research (``pfl``), the way its PyTorch benchmarks run FedAvg.

``FederatedAveraging`` on a ``SimulatedBackend`` with ``WeightByDatapoints``, a ``PyTorchModel``
whose central optimizer is SGD with learning rate 1 (so the new model is the example-weighted mean
of the clients' models), plain local SGD at the workload's learning rate, epochs and batch size.
pfl's fast mode is several long-lived worker processes, each training its share of the cohort in
place and all-reducing once per round: this runner is launched under ``torchrun --nproc_per_node P``
(P = cores, one torch thread each), which pfl 0.6 detects; ``user_id_to_weight`` (examples per
client) turns on pfl's straggler-minimising split of the cohort over workers. The round's clients
come from the shared schedule (a user sampler that replays it). pfl's ``Dataset`` yields a client's
rows in stored order (no shuffling): the same number of steps on the same rows, another order.
Evaluation is off after the first round; the final model is scored on the test split by rank 0.
A round is timed between consecutive ``after_central_iteration`` callbacks (the first from
``on_train_begin``).

    torchrun --nproc_per_node 2 benchmarks/peers/run_pfl.py WORKLOAD_DIR RESULT_JSON --threads 1
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
from pfl.aggregate.simulate import SimulatedBackend
from pfl.aggregate.weighting import WeightByDatapoints
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
from pfl.callback.base import TrainingProcessCallback
from pfl.data.dataset import Dataset
from pfl.data.federated_dataset import FederatedDataset
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
from pfl.internal.ops.selector import get_default_framework_module
from pfl.metrics import Metrics, Weighted
from pfl.model.pytorch import PyTorchModel

from workload import Workload, load, write_result


class PflNet(torch.nn.Module):
    """The workload's model with the ``loss``/``metrics`` methods pfl's ``PyTorchModel`` calls."""

    def __init__(self, wl: Workload):
        super().__init__()
        self.net = wl.new_model()
        self._loss = wl.loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> torch.Tensor:  # noqa: A002
        self.eval() if eval else self.train()
        return self._loss(self(x), y)

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> dict[str, Weighted]:  # noqa: A002
        return {"loss": Weighted(float(self.loss(x, y, eval=True)) * len(x), len(x))}


class ScheduleSampler:
    """A pfl user sampler that replays the shared schedule (then repeats it: pfl samples ahead)."""

    def __init__(self, schedule: list[list[int]]):
        self.stream = itertools.cycle([c for clients in schedule for c in clients])

    def __call__(self) -> int:
        return next(self.stream)


class RoundTimer(TrainingProcessCallback):
    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_train_begin(self, *, model) -> Metrics:
        self.marks.append(time.perf_counter())
        return Metrics()

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration: int):
        self.marks.append(time.perf_counter())
        return False, Metrics()

    def seconds(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.marks)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload")
    ap.add_argument("result")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per pfl worker process")
    args = ap.parse_args()
    wl = load(args.workload, args.threads)

    def make_dataset(client: int) -> Dataset:
        x, y = wl.client_data(client)
        return Dataset(raw_data=[x, y], user_id=client)

    cohort = len(wl.schedule[0])
    train_data = FederatedDataset(
        make_dataset,
        ScheduleSampler(wl.schedule),
        user_id_to_weight={c: wl.num_examples(c) for c in range(wl.num_clients)},
    )
    net = PflNet(wl)
    model = PyTorchModel(
        model=net,
        local_optimizer_create=torch.optim.SGD,
        central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
    )
    backend = SimulatedBackend(training_data=train_data, val_data=None, postprocessors=[WeightByDatapoints()])
    timer = RoundTimer()
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(
            central_num_iterations=wl.rounds,
            evaluation_frequency=wl.rounds + 1,  # iteration 0 only: the warm-up round
            train_cohort_size=cohort,
            val_cohort_size=0,
        ),
        backend=backend,
        model=model,
        model_train_params=NNTrainHyperParams(
            local_learning_rate=float(wl.spec["lr"]),
            local_num_epochs=int(wl.spec["local_epochs"]),
            local_batch_size=int(wl.spec["batch_size"]),
        ),
        model_eval_params=NNEvalHyperParams(local_batch_size=1024),
        callbacks=[timer],
    )
    distributed = get_default_framework_module().distributed
    if distributed.global_rank == 0:
        write_result(args.result, "pfl", timer.seconds(), wl.evaluate(net.net), workers=distributed.world_size)


if __name__ == "__main__":
    main()
