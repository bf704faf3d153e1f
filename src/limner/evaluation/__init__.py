"""Evaluation: the DreamBench protocol on real encoders and the world bench on the world's probes."""
