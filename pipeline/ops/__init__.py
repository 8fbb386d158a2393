"""What runs the stages and looks after what they leave: the nightly (`nightly.py`), retention (`retention.py`),
the run history and its report (`history.py`, `report.py`), evaluation (`evaluate.py`), and the one client of a
running app and its Serve controller (`client.py`).

The top of the library: may import every layer below it."""
