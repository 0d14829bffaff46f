"""Engine: Ray server actor + client worker pool. It calls the method interface and knows no method."""

from raymed.engine.federation import run_experiment
from raymed.engine.runtime import init_ray, plan_workers
from raymed.engine.server import ServerActor, assign, sample_clients
from raymed.engine.worker import ClientWorker

__all__ = ["ClientWorker", "ServerActor", "assign", "init_ray", "plan_workers", "run_experiment", "sample_clients"]
