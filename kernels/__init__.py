"""Triton kernels and their launchers, installed as ``fastpurify.kernels``.

Importing a module here imports Triton; :mod:`fastpurify.backend` does so only when the triton backend is
chosen, so ``import fastpurify`` never needs Triton (DESIGN.md rule 4).
"""
