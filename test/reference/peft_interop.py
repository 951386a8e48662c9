#!/usr/bin/env python3
"""PEFT interoperability check (issue "CUDA backend, part 1", item 7), second half.

scripts/interop-export.mjs trains a red-flag LoRA adapter with redflag and writes redflag's f32
logits of a few sequences (one holding <rf>) with the adapter applied, per device (on a GPU also
merged into the weights: "cuda+merged"), to interop.json. This loads the same base model with Hugging Face transformers, grows its vocabulary
to hold <rf> (as the README says), loads the adapter with PeftModel.from_pretrained (LoRA on the
seven projections, <rf> rows as trainable tokens), and compares the logits: relative L2 <= 1e-4
per sequence against each device's (both f32; the sums run in different orders). Then the same
for the second adapter ("patterns": target_modules as a pattern, exclude_modules, rank_pattern,
alpha_pattern) on the base model as it is: PEFT must select, rank and scale its modules as
redflag did.

    python3 test/reference/peft_interop.py OUT/interop.json

Prints one JSON object; exit 1 when a comparison fails, 3 when torch, transformers or peft is missing.
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    try:
        import torch
        import peft
        import transformers
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        print(json.dumps({"interop": "peft", "skipped": f"cannot import: {e}"}))
        return 3
    data = json.load(open(sys.argv[1]))
    base = AutoModelForCausalLM.from_pretrained(data["base"], torch_dtype=torch.float32)
    if base.get_input_embeddings().weight.shape[0] < data["vocab"]:
        base.resize_token_embeddings(data["vocab"])
    model = PeftModel.from_pretrained(base, data["adapter"]).eval()
    results = []
    ok = True
    with torch.no_grad():
        for i, ids in enumerate(data["sequences"]):
            logits = model(torch.tensor([ids])).logits[0].double()
            for device, per_seq in data["logits"].items():
                theirs = torch.tensor(per_seq[i], dtype=torch.float64).reshape(logits.shape)
                rel = float(torch.linalg.norm(theirs - logits) / torch.linalg.norm(logits))
                passed = rel <= 1e-4
                ok &= passed
                results.append({"sequence": i, "device": device, "relL2": rel, "ok": passed,
                                "holdsRf": data["rfTokenId"] in ids})
        if "patterns" in data:
            plain = AutoModelForCausalLM.from_pretrained(data["base"], torch_dtype=torch.float32)
            patterned = PeftModel.from_pretrained(plain, data["patterns"]["adapter"]).eval()
            logits = patterned(torch.tensor([data["sequences"][0]])).logits[0].double()
            for device, per_seq in data["patterns"]["logits"].items():
                theirs = torch.tensor(per_seq[0], dtype=torch.float64).reshape(logits.shape)
                rel = float(torch.linalg.norm(theirs - logits) / torch.linalg.norm(logits))
                passed = rel <= 1e-4
                ok &= passed
                results.append({"adapter": "patterns", "sequence": 0, "device": device, "relL2": rel, "ok": passed})
    print(json.dumps({"interop": "peft", "torch": torch.__version__, "transformers": transformers.__version__,
                      "peft": peft.__version__, "ok": ok, "results": results}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
