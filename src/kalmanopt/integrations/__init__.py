"""Adapters from kalmanopt's optimizers to other frameworks (the optimizers import none of them)."""
