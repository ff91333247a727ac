"""What a checkpoint holds besides parameters, as safetensors + JSON: optimizer and RNG state.

Phase: stage runtime (checkpoints; no communication). Nothing is pickled:
tensors go to a safetensors file, everything else to JSON, and both are read
back without running code. Used by :mod:`pipec.runtime.checkpoint`.

Optimizer state is keyed by the original FQNs instead of the optimizer's
parameter indices, so a checkpoint says which parameter each entry is for::

    optimizer.safetensors  "state/<fqn>/<name>" (exp_avg, step, ...),
                           "group/<g>/<name>" (a tensor hyperparameter)
    optimizer.json         {"state": {fqn: {name: value}},
                            "param_groups": [{hyperparameter: value, "params": [fqn, ...]}]}

RNG state: torch's CPU generator (and every CUDA device's, when CUDA is in
use) as uint8 tensors; Python's ``random`` and, when numpy is imported,
numpy's global generator as JSON.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pipec.errors import CheckpointError

Json = Any  # a value json.dumps accepts


def fsync_path(path: Path) -> None:
    """Flush a file or directory to disk (a directory: its entries, after renames)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- JSON values that keep their Python type -------------------------------------


def _encode(value: Any, where: str) -> Json:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, where) for v in value]}
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _encode(v, where) for k, v in value.items()}
    raise CheckpointError(
        f"{where}: cannot save a {type(value).__name__} in a checkpoint (only tensors, numbers, "
        "strings, None and lists/tuples/dicts of them); keep such state outside the optimizer"
    )


def _decode(value: Json) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_decode(v) for v in value["__tuple__"])
        return {k: _decode(v) for k, v in value.items()}
    return value


# -- optimizer ---------------------------------------------------------------------


def _fqns_by_index(optimizer: torch.optim.Optimizer, names: Mapping[int, str]) -> list[list[str]]:
    """The FQN of every parameter of every group, in the optimizer's order."""
    groups: list[list[str]] = []
    for g, group in enumerate(optimizer.param_groups):
        fqns = []
        for p in group["params"]:
            fqn = names.get(id(p))
            if fqn is None:
                raise CheckpointError(
                    f"the optimizer's param group {g} holds a parameter of shape {tuple(p.shape)} that is "
                    "not one of this pipeline's; build the optimizer over pipe.parameters()"
                )
            fqns.append(fqn)
        groups.append(fqns)
    return groups


def optimizer_to_files(
    optimizer: torch.optim.Optimizer, names: Mapping[int, str]
) -> tuple[dict[str, torch.Tensor], Json]:
    """``optimizer``'s state as (tensors, JSON); ``names`` maps ``id(param)`` to its FQN."""
    fqns = _fqns_by_index(optimizer, names)
    sd = optimizer.state_dict()
    index_fqn = {
        index: fqn
        for group, group_fqns in zip(sd["param_groups"], fqns)
        for index, fqn in zip(group["params"], group_fqns)
    }
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, dict[str, Json]] = {}
    for index, entries in sd["state"].items():
        fqn = index_fqn[index]
        state[fqn] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{fqn}/{key}"] = value.detach().cpu().contiguous()
            else:
                state[fqn][key] = _encode(value, f"optimizer state {key!r} of {fqn}")
    groups: list[dict[str, Json]] = []
    for g, (group, group_fqns) in enumerate(zip(sd["param_groups"], fqns)):
        out: dict[str, Json] = {"params": group_fqns}
        for key, value in group.items():
            if key == "params":
                continue
            if isinstance(value, torch.Tensor):
                tensors[f"group/{g}/{key}"] = value.detach().cpu().contiguous()
            else:
                out[key] = _encode(value, f"optimizer param group {g} {key!r}")
        groups.append(out)
    return tensors, {"state": state, "param_groups": groups}


def optimizer_from_files(
    optimizer: torch.optim.Optimizer,
    names: Mapping[int, str],
    tensors: Mapping[str, torch.Tensor],
    meta: Json,
) -> None:
    """Load what :func:`optimizer_to_files` wrote into ``optimizer`` (same parameters, same groups)."""
    fqns = _fqns_by_index(optimizer, names)
    try:
        saved_groups: list[dict[str, Json]] = meta["param_groups"]
        saved_state: dict[str, dict[str, Json]] = meta["state"]
        saved_fqns = [list(group["params"]) for group in saved_groups]
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"optimizer.json lacks {exc}; the checkpoint is corrupt, save a new one") from None
    if saved_fqns != fqns:
        raise CheckpointError(
            f"the optimizer has {len(fqns)} param group(s) of sizes {[len(f) for f in fqns]}, the checkpoint "
            f"{len(saved_fqns)} of sizes {[len(f) for f in saved_fqns]} (or other parameters); build the "
            "optimizer with the same groups over pipe.parameters() as when saving"
        )
    index = {fqn: i for i, fqn in enumerate(f for group in fqns for f in group)}
    state: dict[int, dict[str, Any]] = {}
    for fqn, entries in saved_state.items():
        state[index[fqn]] = {k: _decode(v) for k, v in entries.items()}
    groups: list[dict[str, Any]] = []
    for group in saved_groups:
        restored = {k: _decode(v) for k, v in group.items() if k != "params"}
        restored["params"] = [index[f] for f in group["params"]]
        groups.append(restored)
    for key, tensor in tensors.items():
        kind, _, rest = key.partition("/")
        owner, _, name = rest.rpartition("/")
        if kind == "state" and owner in index:
            state.setdefault(index[owner], {})[name] = tensor
        elif kind == "group" and owner.isdigit() and int(owner) < len(groups):
            groups[int(owner)][name] = tensor
        else:
            raise CheckpointError(f"optimizer.safetensors holds an unknown entry {key!r}; the checkpoint is corrupt")
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def optimizer_from_parts(
    optimizer: torch.optim.Optimizer,
    names: Mapping[int, str],
    parts: Sequence[tuple[Mapping[str, torch.Tensor], Json]],
) -> None:
    """Load the optimizer state of THIS rank's parameters out of the parts that
    :func:`optimizer_to_files` wrote on another layout (another number of stages,
    ranks or replicas): each parameter's state is found by its FQN in whichever part
    holds it, and group ``g``'s hyperparameters (lr, betas, ...) come from the first
    part whose group ``g`` holds one of this rank's parameters of that group (else the
    first part's group ``g``). The optimizer must have as many param groups as each part."""
    fqns = _fqns_by_index(optimizer, names)
    metas: list[tuple[list[dict[str, Json]], dict[str, dict[str, Json]]]] = []
    for p, (_, meta) in enumerate(parts):
        try:
            metas.append((list(meta["param_groups"]), dict(meta["state"])))
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"optimizer.json lacks {exc}; the checkpoint is corrupt, save a new one") from None
        if len(metas[-1][0]) != len(fqns):
            raise CheckpointError(
                f"the optimizer has {len(fqns)} param group(s), the checkpoint's part {p} has "
                f"{len(metas[-1][0])}; build the optimizer with the same groups as when saving"
            )
    index = {fqn: i for i, fqn in enumerate(f for group in fqns for f in group)}
    state: dict[int, dict[str, Any]] = {}
    for (tensors, _), (_, saved_state) in zip(parts, metas):
        for fqn in set(index) & set(saved_state):
            if index[fqn] in state:
                continue
            entry: dict[str, Any] = {k: _decode(v) for k, v in saved_state[fqn].items()}
            prefix = f"state/{fqn}/"
            entry.update({k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix)})
            state[index[fqn]] = entry
    groups: list[dict[str, Any]] = []
    for g, group_fqns in enumerate(fqns):
        source = next((p for p, (saved, _) in enumerate(metas) if set(saved[g].get("params", ())) & set(group_fqns)), 0)
        restored = {k: _decode(v) for k, v in metas[source][0][g].items() if k != "params"}
        prefix = f"group/{g}/"
        restored.update({k[len(prefix):]: t for k, t in parts[source][0].items() if k.startswith(prefix)})
        restored["params"] = [index[f] for f in group_fqns]
        groups.append(restored)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# -- LR schedulers ----------------------------------------------------------------------


def scheduler_to_json(scheduler: Any) -> Json:
    """An LR scheduler's ``state_dict()`` as JSON (its numbers; a lambda is not saved,
    as torch leaves it out of the state dict too)."""
    state = scheduler.state_dict()
    return {k: _encode(v, f"LR scheduler state {k!r}") for k, v in state.items() if not callable(v)}


def scheduler_from_json(scheduler: Any, meta: Json) -> None:
    if not isinstance(meta, dict):
        raise CheckpointError("scheduler.json is not an object; the checkpoint is corrupt, save a new one")
    scheduler.load_state_dict({k: _decode(v) for k, v in meta.items()})


# -- random number generators -----------------------------------------------------------


def rng_to_files() -> tuple[dict[str, torch.Tensor], Json]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda/{i}"] = s
    version, internal, gauss = random.getstate()
    meta: dict[str, Json] = {"python": [version, list(internal), gauss]}
    np = sys.modules.get("numpy")
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        meta["numpy"] = [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]
    return tensors, meta


def rng_from_files(tensors: Mapping[str, torch.Tensor], meta: Json) -> None:
    try:
        torch.set_rng_state(tensors["torch_cpu"])
        cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda/")]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
        version, internal, gauss = meta["python"]
        random.setstate((version, tuple(internal), gauss))
        np = sys.modules.get("numpy")
        if np is not None and "numpy" in meta:
            kind, keys, pos, has_gauss, cached = meta["numpy"]
            np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"the RNG state in the checkpoint is unreadable ({type(exc).__name__}: {exc}); it is corrupt, "
            "save a new checkpoint"
        ) from None
