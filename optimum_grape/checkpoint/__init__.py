"""Checkpoints on disk: loading bases by name (`load`), where a job may write (`destinations`,
`staging`), saving a pruned folder (`save`) with its card (`card`) and checksums (`manifest`), and the
per-layer counts that survive a later quantizer (`requantized`)."""
