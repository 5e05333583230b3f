"""What the miniature (generated shapes) and natural (photographs) experiments share: the host set-up, the
command line and output folders, the per-configuration statistics and the PSNR-vs-keep figure.

Loaded as the package ``sc_experiment`` by ``packload.load_experiment`` (never via sys.path).
"""
