"""``--overlap-param-gather``: when megatron-core's forward pre-hooks are on, as Megatron-LM's training loop does it.

With the distributed optimizer and ``overlap_param_gather``, the optimizer step updates only this rank's shard of
the parameters; the all-gather of the others runs bucket by bucket from forward pre-hooks of the next forward pass
(``DistributedDataParallel.enable_forward_pre_hook``). So, as Megatron-LM's ``train()``:

* the hooks are off for the first iteration (a bad checkpoint or initialisation does not spread through the first
  all-gather) and turned on after the first successful optimizer step (fp16 may skip the first ones);
* before evaluation and before a checkpoint is saved, the parameters are gathered synchronously
  (``disable_forward_pre_hook(param_sync=True)``) and the hooks turned on again afterwards.

Without ``--overlap-param-gather`` every call here does nothing.
"""

from __future__ import annotations

import contextlib


class ParamGatherHooks:
    def __init__(self, model, active: bool):
        self.model, self.active = model, active
        self.enabled = active  # DistributedDataParallel turns them on when it is built
        if active:
            model.disable_forward_pre_hook(param_sync=False)
            self.enabled = False

    def after_step(self, update_successful: bool) -> None:
        """Call after each training step: turns the hooks on after the first successful one."""
        if self.active and not self.enabled and update_successful:
            self.model.enable_forward_pre_hook()
            self.enabled = True

    @contextlib.contextmanager
    def gathered(self):
        """Every parameter all-gathered for the body (evaluation, checkpoint saving); the hooks back on after it."""
        if not self.enabled:
            yield
            return
        self.model.disable_forward_pre_hook(param_sync=True)
        try:
            yield
        finally:
            self.model.enable_forward_pre_hook()
