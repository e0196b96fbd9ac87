"""The reliability and security suite (``scripts/reliability``); see docs/reliability.md."""
