"""Job entry points: `python -m jobs.<name> --config FILE [--set dotted.key=value ...]`."""
