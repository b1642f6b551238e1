"""The first-hour checks an operator runs on a new node (``python -m aquila_npu.selfcheck --report``): each fused op
against the plain path (``ops``), the collectives for every dtype the code communicates (``collectives``), a tiny
training run against a CPU reference shipped with the package, with save and resume (``training``), the logits
check and the throughput benchmark; ``report`` runs them in child processes and builds the one report."""
