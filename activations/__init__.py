"""Corpus -> tokens -> model -> hook -> on-disk activation cache."""
