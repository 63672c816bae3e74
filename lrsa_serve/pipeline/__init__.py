"""``lrsa pipeline``: train -> export -> serve -> eval -> report in one command (its modules:
docs/architecture.md)."""
