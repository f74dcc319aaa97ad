"""Whole federations on one box: built-in scenarios, virtual sites, Flower's Ray engine, reports."""
