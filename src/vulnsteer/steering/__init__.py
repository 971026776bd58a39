"""Steering: per-row residual-stream additions by forward hooks (`steer`, `steer_tokens`), and fixed-buffer
steering for the static decoder (`SteeringEngine`)."""

from vulnsteer.steering.buffers import SteeringEngine
from vulnsteer.steering.hooks import steer, steer_tokens

__all__ = ["SteeringEngine", "steer", "steer_tokens"]
