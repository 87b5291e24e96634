"""Models split into pipeline stages, on Hugging Face transformers' own modules.

Files:
    presets.py     ModelConfig and the presets (debug, 124m, 500m, 1.5b, gpt-500m), config hash
    staged.py      stage 0 (embedding, final norm, LM head, loss) and relay stages 1..S (runs of decoder layers)
                   with stable parameter names; building from a seed or from a transformers model, and back
    checkpoint.py  pretrained checkpoints in (HF directory, GGUF) and out (HF directory): `gwtf convert|export`
"""
