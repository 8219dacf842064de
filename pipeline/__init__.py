"""Orchestration over activations, vsae, evals and dashboards: the study (plans, grid, report) and the demo."""
