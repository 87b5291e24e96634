"""Models split into pipeline stages, on Hugging Face transformers' own modules.

Files:
    presets.py     ModelConfig (validated, hashable, to/from transformers configs), the presets (debug, debug-gpt,
                   124m, 500m, 1.5b, gpt-355m: each holds what its name says), get_preset, require_equal_stages
    staged.py      stage 0 (HeadStage: embedding, final norm, LM head, loss) and relay stages 1..S (BlockStage: runs
                   of decoder layers) with stable local parameter names; build_stage(s) from a seed,
                   stages_from_hf / stages_to_hf, hf_name_map, forward_stages / loss_stages
    checkpoint.py  staged checkpoints (save_staged, load_staged, weights_hash), pretrained import from a HF directory
                   or GGUF file (load_pretrained) and export to a HF directory (export_hf): `gwtf convert|export`
"""
