"""The design study as a tool: rerun the paper's ablation (:mod:`.ablate`) and look inside
trained models (:mod:`.analyze`)."""
