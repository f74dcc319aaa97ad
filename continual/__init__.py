"""Continual learning: task streams (scenarios), forgetting metrics, EWC and replay."""
