"""Differential privacy: DP-SGD with exact per-example clipping (clipping, dp_sgd), settings and accounting.

Nothing is imported here, so that reading privacy settings does not import TensorFlow.
"""
