"""Pool worker: the program every torchrun rank runs (see main.py)."""
