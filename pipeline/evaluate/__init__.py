"""Evaluation: NLG metrics (pycocoevalcap), the rule-based CT-RATE labeler, CA-F1, ablation tables.

Modules: labeler (18-class CT abnormality labeler), nlg (BLEU/METEOR/ROUGE-L), clinical (CA-F1),
run / __main__ (metrics.json CLI), table (ablation table CLI).
"""
