"""``kiln plan``: the GPU table (``gpus.json``), a roofline calibrated on kiln's own measurements
(``roofline.py``, ``calibration.py``, ``calibration.json``), and the candidates and recommendations for a model
on a GPU (``planner.py``)."""

from kiln.plan.planner import Plan, Row, Workload, gpu_named, load_gpus, make_plan

__all__ = ["Plan", "Row", "Workload", "gpu_named", "load_gpus", "make_plan"]
