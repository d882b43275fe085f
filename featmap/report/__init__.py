"""Reading results tables: claims and verdicts, computed findings, trends and figures."""
