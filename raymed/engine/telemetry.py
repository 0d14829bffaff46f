"""Custom Ray metrics of a federation (``ray.util.metrics``), exported by Ray's metrics agent.

Ray exports them in Prometheus format on each node's metrics port with the prefix ``ray_`` (so
``raymed_round`` is scraped as ``ray_raymed_round``), next to Ray's own metrics; the Grafana
dashboard in ``cluster/grafana/raymed.json`` plots them. Every series carries the tag
``experiment`` (the run's name, which is the trial's name under Ray Tune).
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge

EXPERIMENT = ("experiment",)

# name -> (kind, description, extra tag keys). One place, read by the Grafana dashboard's test too.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "raymed_round": ("gauge", "Last finished federated round", ()),
    "raymed_round_clients_finished": ("gauge", "Clients a worker has finished in the running round", ("worker",)),
    "raymed_examples_per_second": ("gauge", "Training examples per second in the last round", ()),
    "raymed_bytes_up": ("counter", "Bytes sent by clients to the server", ()),
    "raymed_bytes_down": ("counter", "Bytes sent by the server to clients", ()),
    "raymed_train_loss": ("gauge", "Mean training loss of the last round's clients", ()),
    "raymed_eval": ("gauge", "Main evaluation metrics after the last evaluation", ("metric",)),
    "raymed_round_seconds": ("gauge", "Wall time of the last round", ()),
}
EVAL_KEYS = ("global/mean/acc", "personal/client_mean/acc", "val/global/mean/acc", "val/personal/client_mean/acc")  # exported (test and validation)


class Telemetry:
    """The metric objects of one process, tagged with its experiment."""

    def __init__(self, experiment: str):
        self.tags = {"experiment": experiment}
        self._metrics = {
            name: (Gauge if kind == "gauge" else Counter)(name, description=text, tag_keys=EXPERIMENT + extra)
            for name, (kind, text, extra) in METRICS.items()
        }

    def set(self, name: str, value: float, **tags: str) -> None:
        self._metrics[name].set(float(value), tags={**self.tags, **tags})

    def inc(self, name: str, value: float) -> None:
        if value > 0:
            self._metrics[name].inc(float(value), tags=self.tags)

    def round_finished(self, metrics: dict[str, float], examples: int) -> None:
        """Called by the server after each round with its metrics row."""
        self.set("raymed_round", metrics["round"])
        self.set("raymed_train_loss", metrics["train/loss"])
        self.set("raymed_round_seconds", metrics["time/round_s"])
        self.set("raymed_examples_per_second", examples / max(metrics["time/train_s"], 1e-9))
        self.inc("raymed_bytes_up", metrics["comm/bytes_up"])
        self.inc("raymed_bytes_down", metrics["comm/bytes_down"])
        for key in EVAL_KEYS:
            if key in metrics:
                self.set("raymed_eval", metrics[key], metric=key)
