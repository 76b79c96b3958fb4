"""Command-line tools that prepare inputs: `python -m sgjax.tools.<name> --config=...`."""
