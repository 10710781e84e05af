"""Computing steering vectors (installed as ``steer.vectors``; imports ``steer``, never the reverse).

* :mod:`.refusal`  — refusal directions by difference in means, measured layer selection, CAST condition
  (the layer / position / α conventions of every vector file are documented there);
* :mod:`.task`     — safety task vectors θ_aligned − θ_base (dense, top-k, low-rank);
* :mod:`.sae`      — SAE features (sae-lens, optional) that separate harmful from harmless prompts;
* :mod:`.tune`     — per-request α × layer tuning (``steer tune``);
* :mod:`.export`   — llama.cpp control-vector export (GGUF);
* :mod:`.demo`     — the end-to-end pipeline on the built-in family (``steer demo``).
"""
