"""Validation on the host side: turn the agent's measurements into results, gates and reports."""
