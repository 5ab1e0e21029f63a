"""The medical pack: medical VQA datasets in their released layouts (VQA-RAD, SLAKE, PathVQA, PMC-VQA), answer types,
closed/open/choice metrics and the synthetic scan set."""
