"""pytest fixtures shared by the test files (helpers that are not fixtures: tests/helpers.py)."""

import pytest
import torch

from helpers import SHARED_DATA


@pytest.fixture
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not present: {SHARED_DATA} (a user's clone has no ../shared)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def cpu_device():
    """This process as a one-rank CPU (gloo) run with megatron-core's tp1-pp1 state, torn down after the module:
    nothing is left for later tests (HF from_pretrained breaks under the CPU redirection)."""
    from aquila_npu.compat import journal
    from aquila_npu.device.setup import setup
    from aquila_npu.parallel import destroy_model_parallel, initialize_model_parallel

    dev = setup("cpu")
    initialize_model_parallel(1, 1)
    yield dev
    destroy_model_parallel()
    torch.distributed.destroy_process_group()
    journal.undo_all()
