"""The one family of errors a user can fix: bad flags, files, checkpoints, data, devices.

Every command runs through ``aquila_npu.cli.common.run_cli``, which turns any ``UserError`` into one line
``<prog>: error: <message>`` on stderr and exit status 2 (argparse's own status for bad flags). The message names the
flag or the file. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Input the user can fix; the message names the flag or file and says what to do."""


class UsageError(UserError):
    """A flag's value, or a combination of flags, that cannot work (found before any work starts)."""


class ArchitectureMismatch(UsageError):
    """An architecture flag on the command line disagrees with the checkpoint or the registry."""


class DataError(UserError):
    """A data file (training, preprocessing or evaluation data) that is missing, empty or malformed."""


class CheckpointError(UserError):
    """A checkpoint or model folder (Megatron or Hugging Face) that is missing, unreadable or of another model."""


class NotAquilaConfig(CheckpointError):
    """A Hugging Face config.json that does not describe an Aquila2 / LLaMA-architecture model."""


class OutputError(UserError):
    """An output that cannot be written: the device is full, a write failed, or another run is writing it (the
    message names the path; the partial output is removed, earlier output left intact)."""


class LayoutError(UserError):
    """A tensor/pipeline-parallel layout the model cannot be split into."""


class DeviceUnavailable(UserError):
    """``--device`` names a device this machine cannot use (no torch_npu / CANN, no CUDA GPU)."""


class FusedKernelUnavailable(UserError):
    """A fused-kernel switch was given on a device that cannot provide it."""


class PromptTooLong(UserError):
    """A prompt (plus the tokens to generate) that does not fit the model's sequence length."""


class ResultError(UserError):
    """A benchmark result file that cannot be read or compared."""


class MissingDependency(UserError):
    """An optional package a flag needs is not installed (the message names it and the pip command)."""
