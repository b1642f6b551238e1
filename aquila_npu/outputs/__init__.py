"""What every command that writes (training checkpoints, conversions, tokenized datasets) shares: outputs claimed by a
lock, staging and temporary paths that name their owner (``owner``), and writes that end in one line and leave
nothing half-done (``atomic``)."""
