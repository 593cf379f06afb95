"""TrainingJob planning: desired objects (pods.py) and the gang lifecycle (lifecycle.py)."""
