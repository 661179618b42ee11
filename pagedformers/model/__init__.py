"""What the engine knows of a model: the contract (interface.py), one forward's inputs (inputs.py), and how a
model is chosen and built (loader.py)."""
