"""What every package needs and none owns: the error types the CLI turns into messages
(`errors`) and crash-safe file writes (`files`). It imports nothing of ours, so data_pipeline
and parallel, which import nothing else of ours, can use it."""
