"""Checkpoint snapshots: CSI VolumeSnapshots of a TrainingJob's checkpoint volume."""
