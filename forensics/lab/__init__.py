"""The lineage lab: derived checkpoints made on purpose (fine-tuned, upcycled, pruned in depth or width, requantised,
noised, given a new vocabulary, and disguised by output-preserving permutations, rescalings and rotations), each
labelled with a recipe.json, to measure what the forensic signals can and cannot see. See docs/lab.md."""
