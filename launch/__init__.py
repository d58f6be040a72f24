"""FLOPs accounting, sweep planning, launchers, scaling fits, and the `dlm` command."""
