"""The workload in Flower's Simulation Engine (flwr, Ray backend), written as Flower's docs teach.

A ``ServerApp`` runs Flower's own ``FedAvg`` strategy (``flwr.serverapp.strategy``) through its
``start()`` loop; a ``ClientApp`` trains. ``run_simulation`` registers one virtual SuperNode per
registered client and runs ClientApps on a pool of Ray actors (``client_resources``: 1 CPU each, so
as many at once as there are cores, one torch thread each). Two things are pinned so that Flower does
exactly the work the others do: the round's clients come from the shared schedule (FedAvg's
``configure_train`` is overridden to address one node per scheduled client and to name that client's
partition in the message's config), and client-side evaluation is off (``fraction_evaluate=0``; the
final model is scored once on the test split, outside the timed rounds). A round is timed from
``configure_train`` to the end of ``aggregate_train``.

    python benchmarks/peers/run_flower.py WORKLOAD_DIR RESULT_JSON --threads 1 --cpus 2
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

from workload import RoundClock, Workload, load, write_result

_cache: dict[str, object] = {}


def workload() -> Workload:
    """One copy per process (the ServerApp's and each Ray actor's), loaded on first use."""
    if "wl" not in _cache:
        _cache["wl"] = load(os.environ["PEERS_WORKLOAD"], int(os.environ["PEERS_THREADS"]))
    return _cache["wl"]


# ---- client side

client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    wl = workload()
    if "model" not in _cache:  # one module per actor, reloaded with the round's weights
        _cache["model"] = wl.new_model()
    model = _cache["model"]
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    config = msg.content["config"]
    n = wl.local_train(model, int(config["partition-id"]), int(config["server-round"]))
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": n})})
    return Message(content=content, reply_to=msg)


# ---- server side


def connected_nodes(grid: Grid, wanted: int, timeout_s: float = 600.0, poll_s: float = 0.1) -> list[int]:
    """The sorted node ids once all ``wanted`` virtual SuperNodes (one per registered client) are
    connected, waiting as Flower's own sampling waits for ``min_available_nodes``: at 1,000 clients
    under load some register after round 1 begins, and indexing a shorter list failed (IndexError)."""
    deadline = time.monotonic() + timeout_s
    while len(nodes := sorted(grid.get_node_ids())) < wanted:
        if time.monotonic() > deadline:
            raise SystemExit(f"flower: {len(nodes)} of {wanted} SuperNodes connected after {timeout_s:.0f}s; give Ray more time or fewer clients")
        time.sleep(poll_s)
    return nodes


class ScheduledFedAvg(FedAvg):
    """Flower's FedAvg with the round's clients taken from the shared schedule."""

    def __init__(self, wl: Workload, clock: RoundClock):
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=wl.num_clients)
        self.wl, self.clock = wl, clock

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        nodes = connected_nodes(grid, self.wl.num_clients)  # before the clock: registration is not round work
        self.clock.start(server_round)
        messages = []
        for client in self.wl.schedule[server_round - 1]:
            record = RecordDict(
                {"arrays": arrays, "config": ConfigRecord({"server-round": server_round, "partition-id": client})}
            )
            messages.append(Message(content=record, message_type=MessageType.TRAIN, dst_node_id=nodes[client]))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        aggregated = super().aggregate_train(server_round, replies)
        self.clock.stop(server_round)
        return aggregated


server_app = ServerApp()


@server_app.main()
def main_server(grid: Grid, context: Context) -> None:
    wl = workload()
    model = wl.new_model()
    clock = RoundClock()
    strategy = ScheduledFedAvg(wl, clock)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=wl.rounds)
    model.load_state_dict(result.arrays.to_torch_state_dict())
    write_result(os.environ["PEERS_RESULT"], "flower", clock.as_list(), wl.evaluate(model))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload")
    ap.add_argument("result")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per client actor")
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="logical CPUs given to Ray")
    args = ap.parse_args()
    os.environ.update(PEERS_WORKLOAD=os.path.abspath(args.workload), PEERS_RESULT=os.path.abspath(args.result))
    os.environ["PEERS_THREADS"] = str(args.threads)
    wl = workload()
    logging.getLogger("flwr").setLevel(logging.WARNING)  # Flower logs every round at INFO
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=wl.num_clients,
        backend_config={
            "client_resources": {"num_cpus": args.threads, "num_gpus": 0.0},
            "init_args": {"num_cpus": args.cpus, "num_gpus": 0},
        },
    )
    if not os.path.exists(args.result):
        raise SystemExit("flower: the simulation ended without a result (see its log above)")


if __name__ == "__main__":
    main()
