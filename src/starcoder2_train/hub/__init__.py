"""Sharing a model: the model card written with every save, and the upload to the Hugging Face Hub.

`model_card` (README.md with the recipe, data, FIM settings and evaluation results as model-index metadata),
`upload` (`push_to_hub`: what is uploaded and its offline dry run; `BackgroundUploader`: checkpoint uploads
from a background thread, bounded, retried, never failing the run) and `callback` (a card for every
checkpoint, and its upload as `hub_strategy` says). May import `configs` and `evaluation/`.
"""
