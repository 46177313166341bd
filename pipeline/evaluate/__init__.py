"""Evaluation: NLG metrics, the CT-RATE abnormality labeler, CA-F1, GREEN and LLM-judge adapters, tables.

Modules:
  * ``nlg``          BLEU-1..4 (corpus + per report), METEOR (jar corpus + per report; NLTK-style), ROUGE-L
  * ``meteor_nltk``  offline NLTK-algorithm METEOR (exact + Porter stem); ``porter`` its stemmer
  * ``labeler``      rule-based 18-class labeler; ``load_labeler`` picks it or ``radbert`` (CT-CLIP classifier)
  * ``clinical``     per-class P/R/F1 with macro / micro / weighted averages
  * ``green``        GREEN prompt, answer parser, local-model scoring (CLI)
  * ``judge``        M3D-style 0-100 LLM judge on an OpenAI-compatible endpoint (CLI)
  * ``sections``     free-text sentence -> region classifier (also used by ``pipeline.reports``)
  * ``inputs``       reading / pairing predictions and references, tolerant of bad input
  * ``run``          metrics.json per experiment (CLI ``python -m pipeline.evaluate``)
  * ``table``        ablation table (csv / md / png) and per-class CA table (CLI)
"""
