"""Audit mode: data sets, explanation-quality metrics (pure functions), a resumable
runner, the HTML report and the commands."""
