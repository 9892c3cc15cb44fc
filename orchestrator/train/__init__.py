"""One QAT trial: the five-step workflow, run in-process (also inside a Tune trial actor) or as
Ray Train DDP workers.

This package does not import Ray Tune; ``ray.train`` is imported only by the Ray launcher.
"""
