"""Golden images of the embedded model, and the script that makes them (make_golden.py)."""
