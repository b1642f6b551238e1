"""aquila_npu: BAAI Aquila2 on Ascend NPUs, NVIDIA GPUs and CPUs, on top of megatron-core.

Importing the package has no side effects: it imports neither torch_npu nor megatron-core and patches nothing.
"""

__version__ = "0.1.0"
