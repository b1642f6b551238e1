"""Importing aquila_npu has no side effects: no torch_npu, nothing of another library changed."""

import subprocess
import sys

from helpers import ROOT, child_env

CHECK = """
import sys, torch
orig = (torch.cuda.current_device, torch.Tensor.type, torch.empty)
import aquila_npu
import aquila_npu.device.setup, aquila_npu.device.backends, aquila_npu.device.npu_modules
import aquila_npu.device.torch_modules, aquila_npu.compat.journal, aquila_npu.compat.torch
import aquila_npu.compat.megatron_core, aquila_npu.compat.peft, aquila_npu.compat.versions
import aquila_npu.models.registry, aquila_npu.models.config, aquila_npu.models.gpt
import aquila_npu.weights.mapping, aquila_npu.weights.load, aquila_npu.inference.forward
import aquila_npu.testing.npu.ops, aquila_npu.testing.npu.runtime, aquila_npu.testing.npu.transfer_to_npu
import aquila_npu.lora.layers, aquila_npu.lora.convert, aquila_npu.lora.training
from megatron.core.transformer import attention
assert 'torch_npu' not in sys.modules, 'torch_npu was imported'
assert (torch.cuda.current_device, torch.Tensor.type, torch.empty) == orig, 'torch was patched on import'
assert attention.apply_rotary_pos_emb.__module__.startswith('megatron'), 'megatron-core was patched on import'
assert not aquila_npu.compat.journal.applied()
print('clean')
"""


def test_import_has_no_side_effects():
    out = subprocess.run([sys.executable, "-c", CHECK], env=child_env(), capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("clean")


def test_issue_acceptance_one_liner():
    out = subprocess.run([sys.executable, "-c", "import aquila_npu, sys; assert 'torch_npu' not in sys.modules"],
                         env=child_env(), capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
