"""Peer servers the benchmarks measure DUCK-E against (not part of DUCK-E)."""
