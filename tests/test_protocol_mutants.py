"""Tests written to kill surviving mutants of the protocol code (docs/protocol.md, "Mutation testing"): each checks
real behaviour that the existing tests left open."""

from __future__ import annotations
