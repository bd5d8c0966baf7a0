"""Reports, from the records alone: tables, claims, leaderboard, figures, REPORT.md."""
