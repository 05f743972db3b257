"""Rollouts: generation backends and reward sources."""
