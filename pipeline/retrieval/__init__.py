"""Retrieval that more than one stage shares: Recall@K metrics (metrics), saved search indexes (index), running
exported encoders without torch (runtime) and the retrieval bundle's format and reader (bundle).

numpy only at import time; faiss and onnxruntime are imported when used. Nothing here imports torch.
"""
