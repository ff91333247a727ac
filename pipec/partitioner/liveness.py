"""Phase partition: arrays precomputed from a :class:`ChainProblem` for fast stage costs.

Input: a chain problem. Output: prefix sums and two liveness tables that
answer "what does stage ``[i, j)`` receive / send" for many ``(i, j)`` pairs
at once with ``numpy.searchsorted``:

- ``live(c)``: the tensors live across cut ``c`` (``producer < c <= last consumer``).
- receive table, row ``c``: ``live(c)`` keyed by the tensor's first consumer
  ``>= c``. Stage ``[i, j)`` receives exactly the row-``i`` entries with key
  ``< j`` -- a skip that passes through a stage without a consumer in it is
  not received there (it goes straight to its consumer's stage).
- send table, row ``c``: ``live(c)`` keyed by producer. Stage ``[i, j)``
  sends exactly the row-``j`` entries with key ``>= i``.

Rows are stored back to back, sorted by the composite key
``row * (N + 1) + key``; cumulative weights over that order give any row
prefix sum in O(1) after one binary search. Memory is O(sum of tensor
lifetimes in positions).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from pipec.costs.recompute import MODES, node_costs
from pipec.errors import CostModelError
from pipec.partitioner.problem import ChainProblem, exchange_time
from pipec.schedule.in_flight import in_flight_formula

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


class _LiveTable:
    """One of the two tables: entries sorted by ``row * width + key``."""

    def __init__(self, rows: I64, keys: I64, tensor: I64, width: int, num_rows: int) -> None:
        composite = rows * width + keys
        order = np.argsort(composite, kind="stable")
        self.composite = composite[order]
        self.tensor = tensor[order]
        self.width = width
        self.row_start = np.searchsorted(self.composite, np.arange(num_rows + 1, dtype=np.int64) * width)

    def cumulative(self, weight: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Running sum of ``weight[tensor]`` over the table order, with a leading 0."""
        out = np.zeros(len(self.tensor) + 1, dtype=weight.dtype)
        np.cumsum(weight[self.tensor], out=out[1:])
        return out


class Tables:
    """Precomputed arrays of one problem; see the module docstring."""

    def __init__(self, problem: ChainProblem) -> None:
        p = problem
        n, s = p.num_nodes, p.num_stages
        self.n = n
        self._allreduce = p.allreduce_time  # plain callables, not bound to p: no reference cycle
        self.prefix_time: F64 = np.concatenate(([0.0], np.cumsum(np.asarray(p.compute_time, dtype=np.float64))))
        saved = np.zeros(n, dtype=np.int64) if p.saved_bytes is None else np.asarray(p.saved_bytes, dtype=np.int64)
        self.prefix_saved: I64 = np.concatenate(([0], np.cumsum(saved))).astype(np.int64)
        self.speed: F64 = np.array([p.speed_of(k) for k in range(s)], dtype=np.float64)
        self.cuttable = np.ones(n + 1, dtype=bool) if p.cuttable is None else np.array(p.cuttable, dtype=bool)
        self.cuttable[0] = self.cuttable[n] = True
        flight = p.in_flight if p.in_flight is not None else in_flight_formula(
            p.schedule, s, p.ranks, p.num_microbatches)
        self.in_flight: I64 = np.asarray(flight, dtype=np.int64)
        self.in_backward: I64 = np.minimum(
            np.asarray(p.in_backward if p.in_backward is not None else (1,) * s, dtype=np.int64),
            np.maximum(self.in_flight, 1))
        self._build_recompute(p, saved)
        self._build_tensors(p)
        self._build_params(p)
        self._build_pairs(p)
        self._cache: dict[tuple[str, object], npt.NDArray[Any]] = {}

    # -- recompute --------------------------------------------------------------------
    def _build_recompute(self, p: ChainProblem, saved: I64) -> None:
        """Per policy: bytes each node keeps per micro-batch in flight, and the prefix sums
        of those and of the seconds recomputing adds (:mod:`pipec.costs.recompute`)."""
        n = self.n
        self.policies: tuple[str, ...] = p.recompute
        forward = np.zeros(n) if p.forward_time is None else np.asarray(p.forward_time, dtype=np.float64)
        matmul = np.zeros(n, dtype=bool) if p.matmul is None else np.asarray(p.matmul, dtype=bool)
        output = np.zeros(n, dtype=np.int64) if p.output_bytes is None else np.asarray(p.output_bytes, dtype=np.int64)
        self.saved: I64 = saved
        # the loss's backward starts with the gradient of the model output and its own
        # temporary of that size (cross-entropy: log-softmax's and nll's gradients)
        self.loss_grad_bytes = 2 * int(output[-1]) if n else 0
        per_policy = {q: node_costs(q, saved, output, forward, matmul) for q in MODES}
        kept = {q: k for q, (k, _) in per_policy.items()}
        extra = {q: e for q, (_, e) in per_policy.items()}
        self.kept: dict[str, I64] = {q: kept[q] for q in self.policies}
        # zero-bubble split: the gradients I captures at matmul-like nodes wait for W
        self.prefix_grad_held: I64 = np.concatenate(([0], np.cumsum(kept["selective"]))).astype(np.int64)
        self.held_grads: I64 = np.array(
            p.held_grads if p.held_grads is not None else (0,) * p.num_stages, dtype=np.int64)
        # the first stage has no boundary input: its I computes nothing and captures no
        # gradient, W runs its whole backward (pipec.runtime.backward)
        self.held_grads[0] = 0
        self.prefix_kept: dict[str, I64] = {
            q: np.concatenate(([0], np.cumsum(kept[q]))).astype(np.int64) for q in self.policies}
        self.prefix_recompute: dict[str, F64] = {
            q: np.concatenate(([0.0], np.cumsum(extra[q]))) for q in self.policies}

    def activation_weights(self, stage: int) -> tuple[int, int]:
        """``(f - b, b)``: a policy's activation bytes on ``stage`` are
        ``kept * (f - b) + saved * b`` -- ``f`` micro-batches in flight keep their
        kept bytes, the ``b`` whose backward runs hold all of theirs (for ``none``,
        ``saved * f``)."""
        f, b = int(self.in_flight[stage]), int(self.in_backward[stage])
        return f - b, b

    # -- tensors ----------------------------------------------------------------------
    def _build_tensors(self, p: ChainProblem) -> None:
        n = self.n
        num = len(p.tensors)
        prod = np.fromiter((t.producer for t in p.tensors), dtype=np.int64, count=num)
        last = np.fromiter((t.consumers[-1] for t in p.tensors), dtype=np.int64, count=num)
        self.tensor_bytes: I64 = np.fromiter((t.num_bytes for t in p.tensors), dtype=np.int64, count=num)
        self.tensor_mult: F64 = np.fromiter((2.0 if t.is_floating else 1.0 for t in p.tensors),
                                            dtype=np.float64, count=num)
        # a gradient comes back for each floating tensor sent
        self.grad_bytes: I64 = np.where(self.tensor_mult > 1.0, self.tensor_bytes, 0).astype(np.int64)
        self.num_microbatches = p.num_microbatches
        counts = np.fromiter((len(t.consumers) for t in p.tensors), dtype=np.int64, count=num)
        consumers = np.fromiter((c for t in p.tensors for c in t.consumers), dtype=np.int64,
                                count=int(counts.sum()))
        owner = np.repeat(np.arange(num, dtype=np.int64), counts)
        width = n + 1
        # one entry per (tensor, cut it is live across)
        life = last - prod
        entry_tensor = np.repeat(np.arange(num, dtype=np.int64), life)
        start = np.cumsum(life) - life
        entry_cut = prod[entry_tensor] + 1 + (np.arange(int(life.sum()), dtype=np.int64) - start[entry_tensor])
        # first consumer >= cut, by binary search over (owner, consumer) pairs
        where = np.searchsorted(owner * width + consumers, entry_tensor * width + entry_cut)
        next_consumer = consumers[where]
        self.recv = _LiveTable(entry_cut, next_consumer, entry_tensor, width, n + 1)
        self.send = _LiveTable(entry_cut, prod[entry_tensor], entry_tensor, width, n + 1)

    # -- parameters -------------------------------------------------------------------
    def _build_params(self, p: ChainProblem) -> None:
        n, opt = self.n, p.optimizer_state_bytes_per_param
        at_one = np.zeros(n, dtype=np.int64)  # memory of groups whose users sit at one position
        numel_at = np.zeros(n, dtype=np.int64)
        bytes_at = np.zeros(n, dtype=np.int64)
        self.tied_users: list[I64] = []
        self.tied_memory: list[int] = []
        self.tied_bytes: list[int] = []
        self.tied_numel: list[int] = []
        self.tied_trainable: list[bool] = []
        for g in p.params:
            memory = g.num_bytes if g.is_buffer else 2 * g.num_bytes + g.numel * opt
            users = sorted(set(g.users))
            if len(users) == 1:
                at_one[users[0]] += memory
                if not g.is_buffer:
                    numel_at[users[0]] += g.numel
                    bytes_at[users[0]] += g.num_bytes
            else:
                self.tied_users.append(np.asarray(users, dtype=np.int64))
                self.tied_memory.append(memory)
                self.tied_bytes.append(0 if g.is_buffer else g.num_bytes)
                self.tied_numel.append(0 if g.is_buffer else g.numel)
                self.tied_trainable.append(not g.is_buffer)
        self.prefix_param_memory: I64 = np.concatenate(([0], np.cumsum(at_one))).astype(np.int64)
        self.prefix_numel: I64 = np.concatenate(([0], np.cumsum(numel_at))).astype(np.int64)
        self.prefix_param_bytes: I64 = np.concatenate(([0], np.cumsum(bytes_at))).astype(np.int64)

    def prefix_memory(self, stage: int) -> I64:
        """Prefix sums of the part of a stage's memory that only grows with the segment: with
        several recompute policies, per node the least any of them keeps (a lower bound)."""
        rest, held = self.activation_weights(stage)
        grads = int(self.held_grads[stage])
        key = ("mono", (rest, held, grads))
        if key not in self._cache:
            if self.policies == ("none",):
                self._cache[key] = self.prefix_param_memory + self.prefix_saved * int(self.in_flight[stage])
            else:
                least = np.min([self.kept[q] * rest + self.saved * held for q in self.policies], axis=0)
                self._cache[key] = self.prefix_param_memory + np.concatenate(([0], np.cumsum(least))).astype(np.int64)
            if grads:
                self._cache[key] = self._cache[key] + self.prefix_grad_held * grads + self.prefix_param_bytes
        return self._cache[key]

    # -- communication ----------------------------------------------------------------
    def _build_pairs(self, p: ChainProblem) -> None:
        """Rank pair of each stage's sends (``rank(k) -> rank(k+1)``) and receives."""
        s = p.num_stages
        pairs = [(p.rank_of(k), p.rank_of(k + 1)) for k in range(s - 1)] or [(0, 0)]
        self.pairs: list[tuple[int, int]] = sorted(set(pairs))
        index = {pair: q for q, pair in enumerate(self.pairs)}
        send = [index[pairs[min(k, len(pairs) - 1)]] for k in range(s)]
        self.send_pair = send
        self.recv_pair = [send[max(k - 1, 0)] for k in range(s)]
        # a tied group's gradient exchange: the send link, the receive link on the last stage
        self.tie_pair = [send[k] if k < s - 1 else self.recv_pair[k] for k in range(s)]
        self.comm = p.comm_time
        self.tied_comm: dict[int, F64] = {}

    def _comm_per_byte_size(self, pair: int, sizes: I64) -> F64:
        src, dst = self.pairs[pair]
        if self.comm is None:
            return np.zeros(len(sizes), dtype=np.float64)
        unique, inverse = np.unique(sizes, return_inverse=True)
        values = np.array([float(self.comm(int(b), src, dst)) for b in unique], dtype=np.float64)
        if not np.all(np.isfinite(values) & (values >= 0)):
            bad = int(unique[~(np.isfinite(values) & (values >= 0))][0])
            raise CostModelError(
                f"comm_time({bad}, {src}, {dst}) returned {float(self.comm(bad, src, dst))!r}; "
                "expected finite seconds >= 0 -- fix the cost model's link bandwidth/latency"
            )
        return values[inverse.reshape(-1)]

    def comm_cumulative(self, table: str, pair: int) -> F64:
        """Cumulative transfer times (activation + gradient) over ``table``'s order."""
        key = (table, pair)
        if key not in self._cache:
            weight = self._comm_per_byte_size(pair, self.tensor_bytes) * self.tensor_mult
            self._cache[key] = (self.recv if table == "recv" else self.send).cumulative(weight)
        return self._cache[key]

    def bytes_cumulative(self, table: str) -> I64:
        key = (table, "bytes")
        if key not in self._cache:
            self._cache[key] = (self.recv if table == "recv" else self.send).cumulative(self.tensor_bytes)
        return self._cache[key]

    def boundary_memory(self, stage: int, i: I64, j: I64) -> I64:
        """Bytes stage ``stage`` over ``[i, j)`` holds for its boundary tensors, as the
        runtime holds them (:class:`pipec.runtime.comm.P2P`): one receive buffer per
        micro-batch for each tensor received (the buffer is the stage's input activation,
        reused every step) and for the gradient of each floating tensor sent -- ``m`` of
        each, on every backend -- and each sent tensor while its micro-batch is in
        flight (``in_flight``; its send is dropped once complete)."""
        if not len(self.tensor_bytes):
            return np.zeros(len(i), dtype=np.int64)
        m, f = self.num_microbatches, int(self.in_flight[stage])
        # between stages on one rank there are no buffers: tensors are held while in flight
        # (a skip's real peer may sit elsewhere: the neighbours' ranks decide, as for time)
        remote_in = self.pairs[self.recv_pair[stage]][0] != self.pairs[self.recv_pair[stage]][1]
        remote_out = self.pairs[self.send_pair[stage]][0] != self.pairs[self.send_pair[stage]][1]
        received = self.received(self.bytes_cumulative("recv"), i, j)
        sent = self.sent(self.bytes_cumulative("send"), i, j)
        grads = self.sent(self.grad_bytes_cumulative(), i, j)
        out: I64 = (received * (m if remote_in else f) + sent * f + grads * (m if remote_out else 0)).astype(np.int64)
        return out

    def loss_memory(self, j: I64) -> I64:
        """Bytes the loss's backward holds at once on the stage that ends the model
        (``j == N``): twice the model output's (its gradient, and one temporary of its
        size), on top of the micro-batch's activations."""
        out: I64 = np.where(j == self.n, self.loss_grad_bytes, 0).astype(np.int64)
        return out

    def grad_bytes_cumulative(self) -> I64:
        key = ("send", "grad_bytes")
        if key not in self._cache:
            self._cache[key] = self.send.cumulative(self.grad_bytes)
        return self._cache[key]

    def tied_exchange(self, pair: int) -> F64:
        """Seconds to all-reduce each tied group's gradient between the ranks of
        ``pair`` (once per step; 0 for buffers)."""
        if pair not in self.tied_comm:
            ranks = self.pairs[pair]
            values = np.array([exchange_time(self.comm, self._allreduce, int(b), ranks) if trainable else 0.0
                               for b, trainable in zip(self.tied_bytes, self.tied_trainable)], dtype=np.float64)
            if not np.all(np.isfinite(values) & (values >= 0)):
                raise CostModelError(
                    f"allreduce_time of a tied gradient between ranks {list(ranks)} returned "
                    f"{values.tolist()}; expected finite seconds >= 0 -- fix the cost model's link figures"
                )
            self.tied_comm[pair] = values
        return self.tied_comm[pair]

    # -- queries ----------------------------------------------------------------------
    def received(self, cum: npt.NDArray[Any], i: I64, j: I64) -> npt.NDArray[Any]:
        """Sum over what stage ``[i, j)`` receives, of the weight behind ``cum``."""
        t = self.recv
        hi = np.searchsorted(t.composite, i * t.width + j)
        out: npt.NDArray[Any] = cum[hi] - cum[t.row_start[i]]
        return out

    def sent(self, cum: npt.NDArray[Any], i: I64, j: I64) -> npt.NDArray[Any]:
        """Sum over what stage ``[i, j)`` sends, of the weight behind ``cum``."""
        t = self.send
        lo = np.searchsorted(t.composite, j * t.width + i)
        out: npt.NDArray[Any] = cum[t.row_start[j + 1]] - cum[lo]
        return out

    def tied_masks(self, i: I64, j: I64) -> list[tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]]:
        """Per tied group: (has a user in ``[i, j)``, has a user outside it)."""
        out = []
        for users in self.tied_users:
            k = np.searchsorted(users, i)
            inside = (k < len(users)) & (users[np.minimum(k, len(users) - 1)] < j)
            outside = (users[0] < i) | (users[-1] >= j)
            out.append((inside, outside))
        return out


def tables_of(problem: ChainProblem) -> Tables:
    """The :class:`Tables` of ``problem``, built on first use and kept with it.

    Kept in the problem's ``__dict__`` (a frozen dataclass, so through
    ``object.__setattr__``) so they live exactly as long as the problem does;
    the problem itself does not know this module (no import circle).
    """
    found = problem.__dict__.get("_tables")
    if not isinstance(found, Tables):
        found = Tables(problem)
        object.__setattr__(problem, "_tables", found)
    return found


__all__ = ["Tables", "tables_of"]
