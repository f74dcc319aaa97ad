"""Coordinator side: the Flower ServerApp, round orchestration, the registry and the dashboard."""
