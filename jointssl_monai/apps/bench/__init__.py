"""Library code of ``scripts/benchmark.py``: the pretraining step against a plain-loop baseline, the machine's
own matmul rate, the data loader and the clustering steps, each measured as ratios within one run."""
