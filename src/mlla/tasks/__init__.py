"""The tasks a run can train and evaluate, each in a folder of its own above the engine:
:mod:`.classification`, :mod:`.detection` (Mask R-CNN on COCO-format data),
:mod:`.segmentation` (UperNet on ADE20K-layout data) and :mod:`.study` (the paper's design study).
Each holds its model builder, data, evaluation, demo data and pictures."""
