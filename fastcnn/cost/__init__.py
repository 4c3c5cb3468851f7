"""The cost model: per-layer shapes, parameters, multiply-accumulates and bytes of any
torch.nn model (tracing.py, from one run on the meta device), the formulas behind them
(layers.py), and each layer's place on this machine's roofline (roofline.py)."""

from fastcnn.cost.layers import layer_macs
from fastcnn.cost.roofline import Placement, attainable_tflops, bound, place, plot, ridge_point, time_floor_ms
from fastcnn.cost.tracing import LayerCost, Summary, summary

__all__ = ["LayerCost", "Placement", "Summary", "attainable_tflops", "bound", "layer_macs", "place", "plot",
           "ridge_point", "summary", "time_floor_ms"]
