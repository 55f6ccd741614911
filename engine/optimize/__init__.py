"""Solvers for compression plans under a budget: pure math (knapsack) and the budget / cost model for bits."""
