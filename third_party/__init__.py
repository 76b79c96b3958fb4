"""Adapters for outside artifacts (converters of weight files the user already has)."""
