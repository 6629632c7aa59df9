"""Models: our BEiT-3 (loads the official unilm checkpoints), its tokenizer and transform, the teachers.

Kept free of imports so that `pipeline.models.cli` (and `dsmd --help`) does not pay for importing torch.
"""
