"""Seeded partitioners: which training rows of which dataset each simulated client holds.

- ``iid``: rows shuffled and dealt out evenly.
- ``dirichlet``: label skew. For each class, proportions q ~ Dir(alpha · 1_N) over the N clients
  split that class's rows (the per-class form of Li et al. 2021, arXiv:2102.02079, after Hsu et al.
  2019); a smaller alpha means more skew. Sizes vary a lot: with many clients per example some are
  left empty, and the draw is refused.
- ``client_dirichlet``: label skew per client (Hsu et al. 2019, arXiv:1909.06335; pfl-research's
  partition): each client draws its own class mix q ~ Dir(alpha · 1_C) over the C classes and takes an
  equal share of the rows (rows ÷ N) by q, without replacement; when a class runs out, the client's
  other classes (by q) make up the rest. Every client gets an equal share, so it scales to thousands
  of clients.
- ``quantity``: size skew. Client shares q ~ Dir(alpha · 1_N) of IID-shuffled rows.
- ``modality``: each client holds exactly one dataset (one imaging modality): clients are dealt out
  to datasets round-robin, then each dataset's rows are split among its clients IID, or with
  Dirichlet label skew when ``alpha`` is given. This is the cross-modality "hard" setting.

With several datasets, iid/dirichlet/quantity split every dataset over all clients. Every client must
end with at least ``min_examples`` rows in total; skewed draws are retried (a fresh draw from the same
seeded stream) and a clear error names the knob to turn when that keeps failing.
"""

from __future__ import annotations

import numpy as np

from raymed.errors import DataError

ClientRows = dict[str, np.ndarray]  # dataset flag -> row indices into that dataset's training split

_RETRIES = 50


def label_classes(labels: np.ndarray) -> np.ndarray:
    """One class per row for skewing: the label, or for multi-label rows the first positive (+1), 0 if none."""
    labels = labels.reshape(len(labels), -1)
    if labels.shape[1] == 1:
        return labels[:, 0].astype(np.int64)
    first = labels.argmax(axis=1) + 1
    return np.where(labels.any(axis=1), first, 0)


def _split_by_proportions(rows: np.ndarray, proportions: np.ndarray) -> list[np.ndarray]:
    cuts = (np.cumsum(proportions)[:-1] * len(rows)).astype(np.int64)
    return np.split(rows, cuts)


def _iid(n_rows: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [np.sort(part) for part in np.array_split(rng.permutation(n_rows), num_clients)]


def _dirichlet(classes: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for cls in np.unique(classes):
        rows = rng.permutation(np.flatnonzero(classes == cls))
        for client, chunk in enumerate(_split_by_proportions(rows, rng.dirichlet(np.full(num_clients, alpha)))):
            parts[client].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def _client_dirichlet(classes: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    labels = np.unique(classes)
    pools = [list(rng.permutation(np.flatnonzero(classes == c))) for c in labels]
    sizes = [len(part) for part in np.array_split(np.arange(len(classes)), num_clients)]
    parts = []
    for size in sizes:
        mix = rng.dirichlet(np.full(len(labels), alpha))
        taken: list[int] = []
        while len(taken) < size:
            left = np.array([len(pool) > 0 for pool in pools])
            weights = mix * left if (mix * left).sum() > 0 else left.astype(float)
            counts = rng.multinomial(size - len(taken), weights / weights.sum())
            for pool, count in zip(pools, counts):
                taken += [pool.pop() for _ in range(min(count, len(pool)))]
        parts.append(np.sort(np.asarray(taken, dtype=np.int64)))
    return parts


def _quantity(n_rows: int, num_clients: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    shares = rng.dirichlet(np.full(num_clients, alpha))
    return [np.sort(p) for p in _split_by_proportions(rng.permutation(n_rows), shares)]


def _client_size(part: np.ndarray | ClientRows) -> int:
    return len(part) if isinstance(part, np.ndarray) else sum(len(r) for r in part.values())


def _retry(draw, num_clients: int, min_examples: int, what: str) -> list:
    """Call ``draw`` (a fresh draw from the seeded stream each time) until no client is too small."""
    for _ in range(_RETRIES):
        parts = draw()
        smallest = min(_client_size(p) for p in parts)
        if smallest >= min_examples:
            return parts
    raise DataError(
        f"{what} left a client with {smallest} examples (< data.min_examples={min_examples}) in {_RETRIES} "
        f"seeded draws; use fewer clients (clients.num={num_clients}) or a larger data.alpha"
    )


def _split_rows(classes: np.ndarray, parts: int, scheme: str, alpha: float | None, rng) -> list[np.ndarray]:
    if scheme == "iid" or (scheme == "modality" and alpha is None):
        return _iid(len(classes), parts, rng)
    if scheme in ("dirichlet", "modality"):
        return _dirichlet(classes, parts, alpha or 0.5, rng)
    if scheme == "client_dirichlet":
        return _client_dirichlet(classes, parts, alpha or 0.5, rng)
    if scheme == "quantity":
        return _quantity(len(classes), parts, alpha or 1.0, rng)
    raise DataError(f"unknown data.partition {scheme!r}; allowed: iid, dirichlet, client_dirichlet, quantity, modality")


def partition(
    labels: dict[str, np.ndarray],
    scheme: str,
    num_clients: int,
    seed: int,
    alpha: float | None = None,
    min_examples: int = 2,
) -> list[ClientRows]:
    """Assign training rows to ``num_clients`` clients. ``labels`` maps dataset flag → N×L labels."""
    rng = np.random.default_rng([seed, 0x9A27])
    flags = list(labels)
    classes = {flag: label_classes(lab) for flag, lab in labels.items()}
    total = sum(len(v) for v in labels.values())
    if num_clients * min_examples > total:
        raise DataError(
            f"{num_clients} clients need at least {num_clients * min_examples} training examples "
            f"(data.min_examples={min_examples} each) but the datasets hold {total}; lower clients.num"
        )

    if scheme == "modality":
        if num_clients < len(flags):
            raise DataError(
                f"data.partition=modality gives each client one dataset, so clients.num={num_clients} must be "
                f">= the {len(flags)} datasets in data.datasets"
            )
        clients: list[ClientRows] = [{} for _ in range(num_clients)]
        for i, flag in enumerate(flags):
            members = list(range(i, num_clients, len(flags)))  # round-robin: modalities interleave by id
            draw = lambda: _split_rows(classes[flag], len(members), scheme, alpha, rng)  # noqa: E731
            for client, rows in zip(members, _retry(draw, len(members), min_examples, f"modality split of {flag}")):
                clients[client][flag] = rows
        return clients

    def draw_all() -> list[ClientRows]:
        out: list[ClientRows] = [{} for _ in range(num_clients)]
        for flag in flags:
            for client, rows in enumerate(_split_rows(classes[flag], num_clients, scheme, alpha, rng)):
                if len(rows):
                    out[client][flag] = rows
        return out

    return _retry(draw_all, num_clients, min_examples, f"{scheme} split")


def local_split(
    n: int, val_fraction: float, holdout_fraction: float, rng: np.random.Generator, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions of a client's local training, validation and held-out rows. A non-zero fraction
    gets at least one row while the client keeps at least one to train on. ``groups`` (a group id
    per row, e.g. the image a VQA question asks about): whole groups go to one side, the fractions
    counting groups."""
    if groups is not None:
        _, group = np.unique(groups, return_inverse=True)
        parts = local_split(int(group.max()) + 1 if len(group) else 0, val_fraction, holdout_fraction, rng)
        return tuple(np.flatnonzero(np.isin(group, part)) for part in parts)  # type: ignore[return-value]
    order = rng.permutation(n)
    n_hold = min(max(1, int(round(n * holdout_fraction))), n - 1) if n >= 2 and holdout_fraction > 0 else 0
    n_val = min(max(1, int(round(n * val_fraction))), n - n_hold - 1) if n - n_hold >= 2 and val_fraction > 0 else 0
    return np.sort(order[n_hold + n_val :]), np.sort(order[n_hold : n_hold + n_val]), np.sort(order[:n_hold])


def partition_by_site(sites: dict[str, np.ndarray | None], num_clients: int) -> list[ClientRows]:
    """One client per site (``data.partition=by_site``), sites in sorted name order: the federated
    split the data itself records. ``sites``: each dataset's site name per training row."""
    missing = [flag for flag, names in sites.items() if names is None]
    if missing:
        raise DataError(f"data.partition=by_site needs a site for every row; {', '.join(missing)} has none (a CSV with a site column has)")
    names = np.unique(np.concatenate([np.asarray(v) for v in sites.values()]))
    if num_clients != len(names):
        shown = ", ".join(map(str, names[:6])) + (", ..." if len(names) > 6 else "")
        raise DataError(f"data.partition=by_site: the data holds {len(names)} sites ({shown}); set clients.num={len(names)}")
    clients: list[ClientRows] = [{} for _ in names]
    for flag, v in sites.items():  # group the rows by site in one sort (100,000 sites: no per-site scan)
        which = np.searchsorted(names, np.asarray(v))
        order = np.argsort(which, kind="stable")
        bounds = np.searchsorted(which[order], np.arange(len(names) + 1))
        for client in np.flatnonzero(np.diff(bounds)):
            clients[client][flag] = order[bounds[client] : bounds[client + 1]]
    return clients
