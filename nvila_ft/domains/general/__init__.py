"""The general pack: built-in shapes and scenes (domain-free captions and VQA); its metrics are the generic ones."""
