"""Shared pieces of the D.Va project: Genesis tasks, renderers, the image encoder and small utilities.

Nothing algorithm-specific lives here: every script at the top level holds its whole algorithm.
"""
