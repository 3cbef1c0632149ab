"""nccl's rules, enforced over a CPU gloo group, for code that has to run under nccl on GPUs.

nccl reduces only tensors on the GPU and stages every object collective's pickle in one GPU's memory. On a
CPU host every tensor is a CPU tensor, so "is it on the backend's device" cannot be read off the tensor.
Instead, `install()` declares the group GPU-only, as nccl is, and refuses, with the error a GPU-only group
gives, every tensor that did not pass through `distributed.to_backend`: the one step that moves a tensor to
where the backend needs it (whose choice of device is tested on its own, in test_distributed.py). Object
collectives carrying more than OBJECT_LIMIT bytes are refused too: bulk data must go through the disk.
"""
from __future__ import annotations

import pickle
import weakref

import torch

OBJECT_LIMIT = 64 * 1024
REFUSAL = "No backend type associated with device type cpu (nccl rules: a tensor the distribution module did not place)"


class NcclRules:
    """Stands in for torch.distributed inside simvq_common.distributed."""

    TENSOR_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce",
                          "reduce_scatter", "reduce_scatter_tensor", "gather", "scatter", "all_to_all")
    OBJECT_COLLECTIVES = ("broadcast_object_list", "gather_object", "all_gather_object", "scatter_object_list")

    def __init__(self, real) -> None:
        self.real = real
        self.real_objects = {name: getattr(real, name) for name in self.OBJECT_COLLECTIVES}
        self.placed: dict[int, weakref.ref] = {}  # id -> the tensor to_backend made
        self.calls: list[str] = []

    def place(self, tensor: torch.Tensor) -> None:
        self.placed[id(tensor)] = weakref.ref(tensor)

    def is_placed(self, tensor: torch.Tensor) -> bool:
        ref = self.placed.get(id(tensor))
        return ref is not None and ref() is tensor

    def __getattr__(self, name):
        attr = getattr(self.real, name)
        if name in self.TENSOR_COLLECTIVES:
            def checked(tensor, *args, **kwargs):
                for t in tensor if isinstance(tensor, (list, tuple)) else [tensor]:
                    if not self.is_placed(t):
                        raise RuntimeError(REFUSAL)
                self.calls.append(name)
                return attr(tensor, *args, **kwargs)
            return checked
        if name in self.OBJECT_COLLECTIVES:
            attr = self.real_objects[name]

            def limited(objects, *args, **kwargs):
                size = len(pickle.dumps(objects))
                if size > OBJECT_LIMIT:
                    raise RuntimeError(f"nccl rules: {name} of {size:,} bytes (limit {OBJECT_LIMIT:,}): nccl would "
                                       f"stage the whole pickle in one GPU's memory")
                self.calls.append(name)
                return attr(objects, *args, **kwargs)
            return limited
        return attr


def install() -> NcclRules:
    """Put the rules in place for this process (call after importing, before the code under test runs)."""
    from simvq_common import distributed

    rules = NcclRules(distributed.dist)

    def to_backend(tensor: torch.Tensor) -> torch.Tensor:
        # nccl's choice for a CPU tensor is a copy on the current GPU; here a marked copy stands in for it
        wire = tensor.clone()
        rules.place(wire)
        return wire

    distributed.dist = rules
    distributed.to_backend = to_backend
    import torch.distributed as dist

    for name in NcclRules.OBJECT_COLLECTIVES:  # also for code that would bypass the module
        setattr(dist, name, getattr(rules, name))
    return rules
