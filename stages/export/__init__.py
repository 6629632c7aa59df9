"""Shipping the student: ONNX / torch.export encoders (export), and a torch-free retrieval bundle (bundle).

An export directory (``dsmd export``, :func:`stages.export.onnx_export.export_student`) holds
``text_encoder.onnx`` and ``image_encoder.onnx`` (float32, dynamic batch and sequence length), their int8
dynamically quantised twins ``*.int8.onnx``, ``text_encoder.pt2`` / ``image_encoder.pt2`` (torch.export
programs), ``tokenizer.json`` (a `tokenizers` file), ``preprocess.json`` (how text and images are prepared) and
``export.json`` (the student's card, files, and the parity figures measured against the PyTorch student).

A bundle (written by :mod:`stages.export.bundle`; format and reader in :mod:`pipeline.retrieval.bundle`) is a
directory that answers caption queries with onnxruntime, numpy and `tokenizers` alone: the exported text encoder,
the image gallery's embeddings (int8 or float16) with their ids and paths, and a small ONNX scoring graph.
``bundle`` never imports torch.
"""
