"""The local executor: runs the same plans as the operator, as processes on this machine."""
