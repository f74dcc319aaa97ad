"""Aggregation of site updates: subclasses of Flower's message-API strategies."""
