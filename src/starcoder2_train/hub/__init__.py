"""Sharing a model: the model card written with every save, and the upload to the Hugging Face Hub.

`model_card` (README.md with the recipe, data, FIM settings and evaluation results as model-index metadata),
`upload` (`push_to_hub`: what is uploaded and its offline dry run) and `callback` (a card, and optionally an
upload, for every checkpoint). May import `configs` and `evaluation/` (what each result measures).
"""
