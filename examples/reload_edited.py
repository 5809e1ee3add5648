"""Load an edited model folder (`edit.save=model` or `Editor.save_model`) with plain transformers, no kedit_pl,
and generate each listed edit's rewrite prompt.

    python examples/reload_edited.py <run dir>/model
"""
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder = Path(sys.argv[1])
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).eval()
edits = json.loads((folder / "kedit_edits.json").read_text())
hits = 0
for e in edits:
    prompt = e["prompt"].format(e["subject"])
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    hit = text.strip().startswith(e["target_new"])
    hits += hit
    print(f"{'NEW' if hit else '   '} | {prompt} -> {text.strip()!r} (was {e['target_true']!r}, edit {e['target_new']!r})")
print(f"{hits}/{len(edits)} generations start with the new target")
