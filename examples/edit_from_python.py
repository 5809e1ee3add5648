"""Edit SmolLM2 from Python: the README's "From Python" example, runnable as it stands.

    python examples/edit_from_python.py [out_dir]
"""
import sys
from pathlib import Path

from kedit_pl import Editor

out = Path(sys.argv[1] if len(sys.argv) > 1 else "outputs/example")
ed = Editor(method="rome", model="smollm2_135m")  # the same config as `python edit.py method=rome`
fact = dict(subject="Danielle Darrieux", prompt="The mother tongue of {} is", target_new="English",
            paraphrases=["Danielle Darrieux spoke the language"], neighborhood=["The mother tongue of Léon Blum is"])
print("before:", ed.generate("Danielle Darrieux's mother tongue is", max_new_tokens=8))
edit = ed.edit(**fact)  # target_true omitted: the model's own greedy answer
print("target_true (the model's own answer):", edit.requests[0].target_true)
print("after: ", ed.generate("Danielle Darrieux's mother tongue is", max_new_tokens=8))
print("scores:", {k: round(v, 1) for k, v in ed.score([dict(fact, target_true=edit.requests[0].target_true)]).items()})
patch = edit.save(out / "darrieux")  # darrieux.safetensors (rank-one factors) + darrieux.json
print("patch:", patch, f"{(out / 'darrieux.safetensors').stat().st_size / 1024:.1f} KB")
edit.revert()  # bit-exact
print("reverted:", ed.generate("Danielle Darrieux's mother tongue is", max_new_tokens=8))
