"""Worker processes (installed as zeroserve.workers): runtime and engines."""
