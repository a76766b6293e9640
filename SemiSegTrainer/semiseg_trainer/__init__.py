"""SemiSeg trainer: the ``semiseg`` command line and the job protocol the Slicer module drives."""
