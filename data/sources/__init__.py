"""Data sources: each reads one kind of input into a `RawLog` (see `data.assemble`)."""
