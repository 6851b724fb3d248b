"""The lineage lab: derived checkpoints made on purpose (fine-tuned, upcycled, pruned, requantised, noised, and
disguised by output-preserving permutations and rescalings), each labelled with a recipe.json, to measure what the
forensic signals can and cannot see. See docs/lab.md."""
