"""Stage: reports — report.json/.md/.html, comparison with a baseline, the gate's words."""
