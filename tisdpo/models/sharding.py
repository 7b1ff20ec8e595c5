"""Models whose parameters are sharded by FSDP (torch.distributed.fsdp, FSDP1 as Lightning's
FSDPStrategy uses it): detecting them, running generation on them, gathering their full weights.

Under FSDP each rank holds a shard of every wrapped unit (one per decoder layer) and of the root
unit (embeddings, final norm, LM head). A unit's own ``forward`` gathers its parameters for the
call, so a forward through the root works anywhere; ``generate`` does not go through the root's
forward (it calls the inner model), so the root's parameters are gathered around it
(:func:`gathered_root`), and every rank must join each step (``synced_gpus``), or the ranks
that finished early would leave the others waiting in an all-gather.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp._runtime_utils import _post_backward_final_callback


def is_sharded(model) -> bool:
    """True when ``model`` is, or contains, an FSDP unit in a multi-process group."""
    if not isinstance(model, nn.Module) or not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size() > 1 and any(isinstance(m, FSDP) for m in model.modules())


@contextlib.contextmanager
def gathered_root(*roots) -> Iterator[None]:
    """Gather the FSDP roots' own parameters (not their nested units', which gather in their own
    forward) for the duration, so the inner model can be called outside the root's forward:
    ``inner_model.generate``, an attribution's forward and backward, on every rank. A no-op for
    anything that is not an FSDP root."""
    with contextlib.ExitStack() as stack:
        for root in roots:
            if isinstance(root, FSDP):
                stack.enter_context(FSDP.summon_full_params(root, recurse=False, writeback=False))
        yield


def finish_backward(root) -> None:
    """FSDP's end-of-backward cleanup for a backward that no training loss followed.

    A backward to the inputs alone (TI-DPO's attribution, ``autograd.grad`` w.r.t. the embeddings)
    runs each unit's pre-backward hook (its parameters gathered) but not its post-backward hook,
    and only a backward through the root queues the cleanup that reshards them and marks them
    idle. In training the loss's backward does that; in validation nothing does, and the next
    state-dict or checkpoint call refuses units left mid-backward. This runs that cleanup
    (torch's own, private: ``_post_backward_final_callback``). A no-op for a non-FSDP root."""
    if not isinstance(root, FSDP) or not root._is_root:
        return
    _post_backward_final_callback(root, root)


def full_state_dict(root: nn.Module, prefix: str = "") -> dict[str, torch.Tensor] | None:
    """The unsharded state dict of ``root`` (keys under ``prefix``, prefix stripped).

    Under FSDP this is collective: every rank must call it; rank 0 gets the tensors (on the CPU
    when the shards live on an accelerator), the other ranks None. Elsewhere: the module's own
    state dict, on every rank.
    """
    if isinstance(root, FSDP):
        on_cpu = next((p.device.type == "cpu" for p in root.parameters()), True)
        # offload_to_cpu is for accelerator shards (FSDP segfaults offloading CPU shards to the CPU)
        config = FullStateDictConfig(offload_to_cpu=not on_cpu, rank0_only=True)
        with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, config):
            state = root.state_dict()
        if dist.get_rank() != 0:
            return None
    else:
        state = root.state_dict()
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


__all__ = ["finish_backward", "full_state_dict", "gathered_root", "is_sharded"]
