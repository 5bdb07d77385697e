"""Stage 3, a repository as one example (`repo_examples`) and Fill-in-the-Middle at the file or window level
(`fim`)."""
