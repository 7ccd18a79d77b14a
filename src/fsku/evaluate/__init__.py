"""Evaluation: retrieval metrics now; answer metrics (official FSKU score) arrive with inference."""
