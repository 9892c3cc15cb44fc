"""Sweeps on Ray Tune: config -> param_space, Tuner, schedulers, resume."""
