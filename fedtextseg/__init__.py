"""fedtextseg: federated, text-prompted medical image segmentation across partially labeled hospitals.

The library holds everything that is not Flower glue: the universal vocabulary (``vocab``), sites and transforms
(``data``), text embedding banks (``text``), models (``models``), parameter groups (``params``), losses, the
training/evaluation engine, privacy, metrics and reports. ``server/`` and ``client/`` are thin Flower apps over it.
"""

__version__ = "0.1.0"
