"""blockcopy's MMDetection plugin: block-sparse MMDetection detectors configured with blockcopy=dict(...)."""
try:
    import mmdet  # noqa: F401
except ImportError as error:
    raise ImportError(
        "blockcopy_mmdet needs MMDetection, and the package 'mmdet' is not installed; run "
        "tools/install_stack.sh (or install mmdet, mmengine and mmcv into this environment)") from error
