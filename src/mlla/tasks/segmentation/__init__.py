"""UperNet semantic segmentation on ADE20K-layout data (``mlla seg``)."""
