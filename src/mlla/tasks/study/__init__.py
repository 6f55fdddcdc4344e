"""The paper's design study as a tool: its built-in task (:mod:`.data`), rerunning the ablation
(:mod:`.ablate`) and looking inside trained models (:mod:`.analyze`)."""
