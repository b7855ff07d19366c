"""hpopt: distributed hyperparameter searches for atomistic ML potentials on Slurm clusters."""

__version__ = "0.1.0"
