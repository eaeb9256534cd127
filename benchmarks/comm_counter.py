"""Count the bytes a process hands to ``torch.distributed`` (collectives and point-to-point), by op kind
and by the parallel group (TP / DP / PP / world) the call went over.

    counter = CommCounter()
    counter.install()        # before torch.distributed / DeepSpeed comm are initialised (see below)
    ...
    counter.start(); run_one_step(); counter.stop()
    counter.totals()         # {(op, group_kind): {"calls": n, "bytes": b}}
    counter.uninstall()

How: every tensor-level function of :mod:`torch.distributed` (``all_reduce``, ``all_gather``,
``all_gather_into_tensor``, ``reduce_scatter(_tensor)``, ``broadcast``, ``send/recv/isend/irecv``,
``all_to_all(_single)``, ``reduce``, torch 2.13's ``all_gather_single`` / ``reduce_scatter_single``, ``gather``, ``scatter``, the coalesced and private ``_base``
variants, ``batch_isend_irecv``, ``barrier``) is replaced, on both ``torch.distributed`` and
``torch.distributed.distributed_c10d`` (the same function objects), by a wrapper that records the
call and calls the original. DeepSpeed's comm layer (``deepspeed.comm`` -> ``TorchBackend``) calls
``torch.distributed.<fn>`` at call time, except for the all-gather / reduce-scatter functions it
looks up once when its backend is created (``get_all_gather_function``): install the counter
*before* ``deepspeed.init_distributed`` so those captured references are the wrappers too.
Only the outermost counted call is recorded (a wrapped function calling another wrapped function,
e.g. the deprecated ``_all_gather_base`` calling ``all_gather_into_tensor``, counts once). The
object collectives (``broadcast_object_list``...) are not wrapped: their tensor traffic goes through
the wrapped tensor functions and is counted there.

Payload convention (bytes = ``numel * element_size`` of the tensors named here, on the calling rank):

=======================================  ==============================================
op                                       bytes counted
=======================================  ==============================================
all_reduce, reduce, broadcast            the tensor (every rank, root or not)
all_gather(_into_tensor), gather         this rank's input tensor (its contribution)
reduce_scatter(_tensor)                  the whole input (all chunks this rank reduces)
scatter                                  this rank's output tensor
all_to_all(_single)                      this rank's input (tensors)
send / isend                             the tensor sent
recv / irecv                             the tensor received (kept as separate op kinds)
barrier                                  0 (calls only)
=======================================  ==============================================

These are payloads, not wire bytes: a ring all-reduce over ``n`` ranks moves ``2 (n-1)/n`` times
the payload in and out of each rank, an all-gather ``(n-1)`` times the input.

Group kinds: the group object is compared with :func:`megatron_tfree.parallel.state.get`'s groups
(``TP``, ``DP``, ``PP``, ``MP``), then by member ranks (DeepSpeed's pipeline grid builds its own
groups with the same members); ``None`` / the default group is ``world``; a group of one rank is
``solo`` (no byte leaves the process; :meth:`CommCounter.totals` keeps it, callers may drop it).
Point-to-point calls are attributed by peer: a peer in this rank's pipeline group is ``PP``.
"""

from __future__ import annotations

import inspect
import threading
from collections import defaultdict
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

__all__ = ["CommCounter", "WRAPPED", "payload_bytes", "tensor_bytes"]

# function name -> how its payload is read (argument names of torch's own signatures)
WRAPPED: dict[str, tuple[str, ...]] = {
    "all_reduce": ("tensor",),
    "reduce": ("tensor",),
    "broadcast": ("tensor",),
    "all_gather": ("tensor",),
    "all_gather_into_tensor": ("input_tensor",),
    "_all_gather_base": ("input_tensor",),
    "all_gather_single": ("input_tensor",),
    "gather": ("tensor",),
    "reduce_scatter": ("input_list",),
    "reduce_scatter_tensor": ("input",),
    "_reduce_scatter_base": ("input",),
    "reduce_scatter_single": ("input",),
    "scatter": ("tensor",),
    "all_to_all": ("input_tensor_list",),
    "all_to_all_single": ("input",),
    "all_reduce_coalesced": ("tensors",),
    "all_gather_coalesced": ("input_tensor_list",),
    "send": ("tensor",),
    "isend": ("tensor",),
    "recv": ("tensor",),
    "irecv": ("tensor",),
    "batch_isend_irecv": ("p2p_op_list",),
    "barrier": (),
}
# canonical op kind of each function (the private / deprecated aliases join their public op)
OP_KIND = {"_all_gather_base": "all_gather_into_tensor", "all_gather_single": "all_gather_into_tensor",
           "_reduce_scatter_base": "reduce_scatter_tensor", "reduce_scatter_single": "reduce_scatter_tensor",
           "isend": "send", "irecv": "recv"}
P2P = {"send": "dst", "isend": "dst", "recv": "src", "irecv": "src"}


def tensor_bytes(x: Any) -> int:
    """Bytes of a tensor, or the sum over a (nested) list / tuple of tensors; 0 for anything else."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(tensor_bytes(t) for t in x)
    return 0


def payload_bytes(name: str, bound: inspect.BoundArguments) -> int:
    """Payload of one call of ``torch.distributed.<name>`` (see the module docstring's table)."""
    args = bound.arguments
    if name == "batch_isend_irecv":
        return sum(tensor_bytes(op.tensor) for op in args.get("p2p_op_list", ()))
    return sum(tensor_bytes(args.get(a)) for a in WRAPPED[name])


class CommCounter:
    """Wraps ``torch.distributed``'s tensor communication functions in this process and counts the
    calls and payload bytes made while :meth:`start`-ed, keyed by ``(op kind, group kind)``."""

    def __init__(self, names: Optional[Iterable[str]] = None):
        self.names = tuple(names) if names is not None else tuple(n for n in WRAPPED if hasattr(dist, n))
        self._originals: dict[str, Callable] = {}
        self._signatures: dict[str, inspect.Signature] = {}
        self._local = threading.local()
        self._lock = threading.Lock()
        self._group_kind: dict[int, str] = {}
        self.active = False
        self.counts: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: {"calls": 0, "bytes": 0})
        self.log: Optional[list[tuple[str, str, int]]] = None  # (op, group kind, bytes) per call when set to []

    # ------------------------------------------------------------------------------ install / control
    def install(self) -> "CommCounter":
        if self._originals:
            return self
        for name in self.names:
            original = getattr(dist, name)
            self._originals[name] = original
            self._signatures[name] = inspect.signature(original)
            wrapper = self._wrap(name, original)
            setattr(dist, name, wrapper)
            if getattr(c10d, name, None) is original:
                setattr(c10d, name, wrapper)
        return self

    def uninstall(self) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)
            if hasattr(c10d, name):
                setattr(c10d, name, original)
        self._originals.clear()

    def start(self) -> None:
        self.active = True

    def stop(self) -> None:
        self.active = False

    def reset(self) -> None:
        self.counts.clear()
        if self.log is not None:
            self.log = []

    # ------------------------------------------------------------------------------ results
    def totals(self) -> dict[tuple[str, str], dict[str, int]]:
        return {k: dict(v) for k, v in self.counts.items()}

    def total_bytes(self, include_solo: bool = False) -> int:
        return sum(v["bytes"] for (op, g), v in self.counts.items() if include_solo or g != "solo")

    # ------------------------------------------------------------------------------ internals
    def _wrap(self, name: str, original: Callable) -> Callable:
        counter = self

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(counter._local, "depth", 0)
            if counter.active and depth == 0:
                try:
                    counter._record(name, counter._signatures[name].bind(*args, **kwargs))
                except TypeError:  # a call the signature does not accept: let torch raise its error
                    pass
            counter._local.depth = depth + 1
            try:
                return original(*args, **kwargs)
            finally:
                counter._local.depth = depth

        wrapper.__name__ = name
        wrapper.__qualname__ = f"counted_{name}"
        wrapper.__wrapped__ = original  # type: ignore[attr-defined]
        wrapper.__signature__ = self._signatures[name]  # type: ignore[attr-defined]
        return wrapper

    def _record(self, name: str, bound: inspect.BoundArguments) -> None:
        op = OP_KIND.get(name, name)
        args = bound.arguments
        if name in P2P:
            peer = args.get(P2P[name])
            kind = self._peer_kind(peer if peer is not None else args.get("group_" + P2P[name]), args.get("group"))
        elif name == "batch_isend_irecv":
            ops = list(args.get("p2p_op_list", ()))
            kind = self._peer_kind(ops[0].peer, ops[0].group) if ops else "world"
        else:
            kind = self.group_kind(args.get("group"))
        nbytes = payload_bytes(name, bound)
        with self._lock:
            entry = self.counts[(op, kind)]
            entry["calls"] += 1
            entry["bytes"] += nbytes
            if self.log is not None:
                self.log.append((op, kind, nbytes))

    def _peer_kind(self, peer: Any, group: Any) -> str:
        from megatron_tfree.parallel import state

        if group is not None and group is not dist.GroupMember.WORLD:
            return self.group_kind(group)
        s = state.get()
        if peer is not None and state.is_initialized() and int(peer) in s.pp_ranks:
            return "PP"
        if peer is not None and state.is_initialized() and int(peer) in s.dp_ranks:
            return "DP"
        if peer is not None and state.is_initialized() and int(peer) in s.tp_ranks:
            return "TP"
        return "world"

    def group_kind(self, group: Any) -> str:
        """``TP`` / ``DP`` / ``PP`` / ``MP`` / ``world`` / ``solo`` / ``other`` for a process group."""
        from megatron_tfree.parallel import state

        if group is None or group is dist.GroupMember.WORLD:
            return "world" if dist.get_world_size() > 1 else "solo"
        key = id(group)
        if key in self._group_kind:
            return self._group_kind[key]
        ranks = tuple(dist.get_process_group_ranks(group))
        if len(ranks) == 1:
            kind = "solo"
        elif not state.is_initialized():
            kind = "world" if len(ranks) == dist.get_world_size() else "other"
        else:
            s = state.get()
            by_object = {id(s.tp_group): "TP", id(s.dp_group): "DP", id(s.pp_group): "PP", id(s.mp_group): "MP"}
            by_ranks = {tuple(s.tp_ranks): "TP", tuple(s.dp_ranks): "DP", tuple(s.pp_ranks): "PP"}
            kind = by_object.get(key) or by_ranks.get(tuple(sorted(ranks))) or (
                "world" if len(ranks) == dist.get_world_size() else "other")
        self._group_kind[key] = kind
        return kind
