"""Evaluation: NLG metrics, the CT-RATE abnormality labeler, CA-F1, GREEN and LLM-judge adapters, tables.

Modules:
  * ``nlg``          BLEU-1..4, METEOR, ROUGE, CIDEr-D: every variant, each labelled (implementation, averaging)
  * ``hf_evaluate``  Hugging Face ``evaluate``'s bleu / meteor (NLTK + WordNet 3.0) / rouge, offline
  * ``bootstrap``    mean +- std, bootstrap CIs over volumes, paired bootstrap between experiments
  * ``score``        ``python -m pipeline.evaluate score``: every variant on any CSV/Parquet of report pairs
  * ``labeler``      rule-based 18-class labeler; ``load_labeler`` picks it or ``radbert`` (CT-CLIP classifier)
  * ``clinical``     per-class P/R/F1 with macro / micro / weighted averages
  * ``green``        GREEN prompt, answer parser, local-model scoring (CLI)
  * ``judge``        M3D-style 0-100 LLM judge on an OpenAI-compatible endpoint (CLI)
  * ``sections``     free-text sentence -> region classifier (also used by ``pipeline.reports``)
  * ``inputs``       reading / pairing predictions and references, tolerant of bad input
  * ``run``          metrics.json per experiment (CLI ``python -m pipeline.evaluate``)
  * ``table``        ablation table (csv / md / png) and per-class CA table (CLI)
"""
