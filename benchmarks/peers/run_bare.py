"""The limit: the workload's FedAvg rounds as one plain PyTorch loop in one process, no framework.

For each scheduled client: load the global weights, train (``Workload.local_train``), add n_k·w_k to
a float64 sum; then average. Nothing else happens, so no simulator can do the same steps faster on
the same threads.

    python benchmarks/peers/run_bare.py WORKLOAD_DIR RESULT_JSON --threads T
"""

from __future__ import annotations

import argparse

import torch

from workload import RoundClock, Workload, load, write_result


def fedavg(wl: Workload) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Every scheduled round; returns the final global weights and the seconds of each round."""
    model = wl.new_model()
    global_weights = {k: v.clone() for k, v in model.state_dict().items()}
    clock = RoundClock()
    for r, clients in enumerate(wl.schedule, start=1):
        clock.start(r)
        sums = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_weights.items()}
        total = 0
        for client in clients:
            model.load_state_dict(global_weights)
            n = wl.local_train(model, client, r)
            for k, v in model.state_dict().items():
                sums[k] += n * v.double()
            total += n
        global_weights = {k: (s / total).float() for k, s in sums.items()}
        clock.stop(r)
    return global_weights, clock.as_list()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload")
    ap.add_argument("result")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    wl = load(args.workload, args.threads)
    weights, seconds = fedavg(wl)
    model = wl.new_model()
    model.load_state_dict(weights)
    write_result(args.result, "bare", seconds, wl.evaluate(model), threads=args.threads)


if __name__ == "__main__":
    main()
