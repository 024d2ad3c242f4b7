"""Checkpoints in and out of other tools: export formats (a registry, one module each), import of plain
PyTorch files and of other tools' checkpoints, inspection and diff, and loading weights for inference or a
warm start.

Modules: ``export`` (the driver: choose a checkpoint, consolidate, dispatch to a registered format),
``formats`` (the registry), ``pt``, ``safetensors``, ``torchscript``, ``onnx`` (one format each; safetensors
also holds the reader the importer uses), ``live`` (rebuilding models and checking converted programs),
``quantize``, ``importer`` (understanding and writing), ``sources`` (reading a file or another tool's folder:
``lightning``, ``hf``, ``hf_trainer``, ``accelerate``, ``deepspeed``, ``dcp`` with ``dcp_general``),
``torchload`` (the one ``torch.load(weights_only=True)``), ``inspection``, ``inference``. Output files are
written by the project's one atomic local writer, :mod:`harness.storage.local`.

Nothing here is imported by ``checkpoint/`` or ``storage/``; this package uses them and ``recipe``, never the
trainer or the CLI.
"""
