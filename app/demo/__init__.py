"""The live demo page of a checkpoint: NLI, confidence tokens, confidence head (app/demo/app.py, views.py)."""
