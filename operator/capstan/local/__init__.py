"""The local runtime: runs the same plans as the operator, as processes on this machine."""
