"""Evaluation of trained models (`dlm eval`, docs/algorithms.md §8): likelihood, generation
quality under a judge, sampling speed, the speed-quality Pareto, and zero-shot tasks through
lm-evaluation-harness. Above checkpoints_tools, which it uses to read Hugging Face exports."""
