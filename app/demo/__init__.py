"""The live demo page of an NLI checkpoint (app/demo/app.py)."""
