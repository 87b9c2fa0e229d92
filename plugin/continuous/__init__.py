"""Continuous attention (Martins et al. 2020)."""
