"""What tools/benchmark.py and tools/compare_pq.py measure, next to them (not in the library).

- :mod:`.scenes`: synthetic panoptic scenes rendered at the network size.
- :mod:`.runner`: :class:`~.runner.Runner`, the interface through which every model is timed.
- :mod:`.maskattn`: MaskAttn-UNet's config at the benchmark's size and its runner.
- :mod:`.peers`: Panoptic-DeepLab (detectron2 project) and Mask2Former (``transformers``),
  their configs and runners.

The scripts import it as ``benchmarking`` (their own folder is on ``sys.path``); the tests
through ``pythonpath = tools`` in setup.cfg. Importing it registers nothing: the one backbone
it adds to detectron2's registry is registered by the config that names it.
"""
