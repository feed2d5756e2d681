"""Distributions on manifolds."""
