"""Ray Tune sweeps over whole federations: one Tune trial = one federation in its own placement group.

``spec`` reads a sweep YAML (an experiment, a search space over its keys, a scheduler and a search
algorithm); ``trial`` is the Tune trainable that runs one federation and reports after each
evaluation; ``tuner`` builds the ``ray.tune.Tuner``, runs it and writes the trial table and the best
config as a runnable experiment YAML.
"""

from raymed.sweep.spec import SweepConfig, load_saved_sweep, load_sweep
from raymed.sweep.tuner import run_sweep

__all__ = ["SweepConfig", "load_saved_sweep", "load_sweep", "run_sweep"]
