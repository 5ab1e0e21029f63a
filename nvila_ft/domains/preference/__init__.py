"""The preference pack: chosen/rejected preference records (for `nvila-ft dpo`) and the synthetic preference set."""
