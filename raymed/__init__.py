"""raymed: simulate federated learning of medical models on Ray.

The package follows the pipeline: ``data`` (MedMNIST files, partitions, Arrow shards) → ``methods``
(one module per federated method, client update and server aggregation together) → ``engine`` (Ray
server actor and client worker pool, which know no method) → ``results`` (Parquet, report, plots).
"""

__version__ = "0.1.0"

import os as _os

# Secure by default: a local Ray started by raymed requires a token for its dashboard, jobs API and
# RPCs. Ray reads this when it is imported, so it is set here, before any `import ray`. An explicit
# RAY_AUTH_MODE in the environment wins.
_os.environ.setdefault("RAY_AUTH_MODE", "token")
