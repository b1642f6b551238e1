"""The one family of errors a command ends with in one line (``AquilaError``): what a user can fix (``UserError``:
bad flags, files, checkpoints, data, devices, versions; exit status 2, argparse's own status for bad flags) and a
check that ran and found a problem (``CheckFailed``: a selfcheck mismatch, a failed benchmark run, a demo below its
accuracy; exit status 1).

Every command runs through ``aquila_npu.cli.common.run_cli``, which turns any ``AquilaError`` into one line
``<prog>: <label>: <message>`` on stderr and its ``exit_status``. The message names the flag or the file. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class AquilaError(Exception):
    """An end a command reports in one line."""

    exit_status = 1
    label = "error"


class UserError(AquilaError):
    """Input the user can fix; the message names the flag or file and says what to do."""

    exit_status = 2


class CheckFailed(AquilaError):
    """A check that ran to the end and found a problem (the message says which and where the details are)."""

    exit_status = 1
    label = "check failed"


class BenchmarkFailed(CheckFailed):
    """A benchmark or check process exited with an error (the message names its log)."""


class UnsupportedVersion(UserError):
    """torch, torch_npu, megatron-core or peft outside the versions this release supports (aquila_npu.compat)."""


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


class StaleReference(UserError):
    """A shipped reference (the selfcheck's CPU losses) made from other inputs than the code uses now."""
