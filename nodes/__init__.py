"""Thin V3 nodes: parse inputs, call the core through the bridge, return outputs.

Each module lists its node classes in ``NODES``; this package gathers them in menu order.
"""
from . import decode_nodes, layout_nodes, metric_nodes, photo_nodes, sampler_nodes, seam_nodes


NODES = [
    *sampler_nodes.NODES,
    *layout_nodes.NODES,
    *photo_nodes.NODES,
    *metric_nodes.NODES,
    *decode_nodes.NODES,
    *seam_nodes.NODES,
]
