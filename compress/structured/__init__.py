"""Structured pruning: the channel engine and the rules that let it cut any classifier."""
